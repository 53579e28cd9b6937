# frozen_string_literal: true

module QueueDispatcher
  # Base of every error this library raises. The native extension defines the subclasses, one
  # per engine error variant (mapped exhaustively in bindings-ruby/src/errors.rs):
  #
  #   InvalidInputError       an argument is malformed (#field names it): bad option, non-JSON
  #                           argument, forbidden or unregistered target
  #   NotFoundError           no task with this id (#task_id)
  #   MissingDependencyError  a dependency names a task that does not exist
  #   DependencyCycleError    the dependency would close a cycle
  #   InvalidStateError       the task's state does not allow this (e.g. it already started)
  #   StaleTokenError         an outcome of a run that was declared lost was refused
  #   NotADatabaseError       the file is not a queue_dispatcher database
  #   SchemaTooNewError       the database was written by a newer version
  #   BusyError               the database stayed locked past the busy timeout
  #   StoppedError            the dispatcher is stopped
  #   StorageError            any other storage failure (I/O, disk full...)
  class Error < StandardError
    # The argument at fault (InvalidInputError), else nil.
    attr_reader :field
    # The task concerned, where the error names one.
    attr_reader :task_id
  end

  # @api private
  def self.invalid(field, message)
    e = InvalidInputError.new("invalid #{field}: #{message}")
    e.instance_variable_set(:@field, field.to_s)
    e
  end
end
