# frozen_string_literal: true

# The job the Ruby benchmark enqueues and the benchmarked dispatcher loads (`-r`).
require 'queue_dispatcher'

class BenchJob
  include QueueDispatcher::Job

  def self.noop(*) = nil
end
