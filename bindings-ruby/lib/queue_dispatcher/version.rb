# frozen_string_literal: true

module QueueDispatcher
  # The one version of the project: Cargo's workspace version, read from the native extension.
  VERSION = Native::VERSION
end
