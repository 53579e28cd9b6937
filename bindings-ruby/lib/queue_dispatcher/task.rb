# frozen_string_literal: true

module QueueDispatcher
  # A stored task, as the original gem's Task model showed it. Attributes are those of the last
  # read (the first access reads, `reload` reads again); `wait` blocks until the task finished.
  class Task
    STATES = %w[new running successful error aborted].freeze

    attr_reader :id

    # @api private: tasks come from enqueue, QueueDispatcher.tasks or Task.find.
    def initialize(id, attributes = nil)
      @id = id
      @attributes = attributes
    end

    def self.find(id)
      new(id).reload
    end

    def reload
      @attributes = QueueDispatcher.store.task(@id)
      @result = @meta = nil
      self
    end

    # All stored fields as a Hash with Symbol keys (times are Integer microseconds, UTC).
    def attributes
      @attributes || reload.attributes
    end
    alias to_h attributes

    def state = attributes[:state]
    def queue = attributes[:queue]
    def target = attributes[:target]
    def priority = attributes[:priority]
    def attempts = attributes[:attempts]
    def retries = attributes[:retries]
    def message = attributes[:message]
    def perc_finished = attributes[:perc_finished]
    def unique_key = attributes[:unique_key]
    def error = attributes[:error]
    def error_history = attributes[:error_history]

    # The original gem's name for the failure text: "Class: message".
    def error_msg
      e = error
      e && "#{e[:class]}: #{e[:message]}"
    end

    # The return value, parsed from its stored JSON (Hash keys are Strings).
    def result
      return @result if defined?(@result) && !@result.nil?

      text = attributes[:result]
      @result = text && JSON.parse(text, quirks_mode: true)
    end

    # The JSON object given as `meta:` at enqueue (String keys).
    def meta
      text = attributes[:meta]
      @meta ||= text && JSON.parse(text)
    end

    def args
      JSON.parse(attributes[:args])
    end

    %i[run_at enqueued_at started_at finished_at].each do |field|
      define_method(field) do
        us = attributes[field]
        us && Time.at(us / 1_000_000, us % 1_000_000, :usec)
      end
    end

    # Tasks this one runs after.
    def dependent_tasks
      attributes[:depends_on].map { |id| Task.new(id) }
    end

    # The original idiom: run this task only after `tasks` (a Task, an id, or an Array of them)
    # finished successfully. Only while it is `new` and was never claimed: race-free inside
    # QueueDispatcher.batch or with the daemon stopped (or use `depends_on:` at enqueue).
    def dependent_tasks=(tasks)
      ids = Array(tasks).map { |t| t.is_a?(Task) ? t.id : Integer(t) }
      QueueDispatcher.store.add_dependencies(@id, ids)
      @attributes = nil
    end

    # Blocks until the task is finished or `timeout` seconds pass; returns self (reloaded).
    # Ctrl-C, Thread#kill and Thread#raise interrupt the wait promptly.
    def wait(timeout = nil)
      @attributes = QueueDispatcher.store.wait(@id, timeout&.to_f)
      @result = @meta = nil
      self
    end

    # A `new` task becomes `aborted`; a running one is asked to stop (it is stored `aborted`
    # when its code returns). Returns the state.
    def cancel
      state = QueueDispatcher.store.cancel(@id)
      @attributes = nil
      state
    end

    def new? = state == 'new'
    # Waiting to run (the original: new and in a queue).
    def pending? = state == 'new'
    def running? = state == 'running'
    def successful? = state == 'successful'
    def error? = state == 'error'
    def aborted? = state == 'aborted'
    def executed? = successful? || error? || aborted?

    def ==(other)
      other.is_a?(Task) && other.id == id
    end
    alias eql? ==

    def hash = id.hash

    def inspect
      return "#<QueueDispatcher::Task id=#{id}>" unless @attributes

      "#<QueueDispatcher::Task id=#{id} #{target} state=#{state}#{queue ? " queue=#{queue}" : ''}>"
    end
    alias to_s inspect
  end
end
