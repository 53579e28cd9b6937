# frozen_string_literal: true

module QueueDispatcher
  # A Python task named from Ruby: `QueueDispatcher.python_task('myapp.jobs:resize', queue: 'img')
  # .enqueue('a.png', width: 200)` stores a task that only Python dispatchers claim, with the same
  # options as a Ruby enqueue, and returns an ordinary QueueDispatcher::Task. This process cannot
  # see Python's registry, so only what the name shows is checked here (syntax, no `_` names); a
  # name no Python dispatcher registered ends in `error` (UnregisteredTask) when it is claimed.
  class PythonTask
    attr_reader :target, :options

    def initialize(target, options)
      @target = target.to_s.dup.freeze
      Options.normalize(options) # refuses bad options now rather than at the first enqueue
      @options = options.dup.freeze
    end

    # Stores the call `target(*args, **kwargs)` (JSON values; Symbols become Strings, keyword
    # arguments reach Python as keyword arguments); durable when this returns.
    def enqueue(*args, **kwargs)
      # Normalized per call: `delay:` counts from this enqueue.
      opts = (Options.normalize(@options) || {}).merge(runtime: 'python')
      Task.new(QueueDispatcher.store.enqueue(@target, nil, args, kwargs, opts))
    end

    def inspect = "#<QueueDispatcher::PythonTask #{@target}>"
  end

  class << self
    # A task of the Python dispatchers, by its registered name ("module:function" or
    # "module:Class.method"); options: queue:, priority:, depends_on:, run_at: / delay:,
    # retries:, timeout:, unique_key:, meta:. See PythonTask.
    def python_task(target, **options)
      PythonTask.new(target, options)
    end
  end
end
