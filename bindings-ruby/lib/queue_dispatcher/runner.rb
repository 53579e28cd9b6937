# frozen_string_literal: true

require 'English'
require 'logger'

module QueueDispatcher
  # Runs tasks in this process: one engine dispatcher and N Ruby worker threads. Each worker
  # thread waits inside the engine's claim with the GVL released (Thread#kill, signals and
  # `stop` wake it), runs the task's code on its own Ruby thread, and reports the outcome, which
  # is acknowledged only after its commit. Delivery is at-least-once: a task whose outcome never
  # reached the database (crash, SIGKILL) runs again after its lease expires.
  class Runner
    # What a task's code sees through QueueDispatcher.update_message / current_task / cancelled?.
    # One per worker thread, pointed at the task it runs (nil between tasks).
    class Context
      attr_reader :worker, :claimed

      def initialize(worker)
        @worker = worker
        @claimed = nil
        @task = nil
      end

      def running(claimed)
        @claimed = claimed
        @task = nil
      end

      def task
        @claimed && (@task ||= Task.new(@claimed.id))
      end

      def progress(msg, perc)
        raise Error, 'update_message called outside a running task' unless @claimed

        worker.progress(@claimed, msg&.to_s, perc&.to_f)
      end

      def cancelled
        @claimed&.cancelled
      end
    end

    NO_ARGS = '{"args":[],"kwargs":{}}'
    NULL = 'null'

    attr_reader :workers, :dispatcher, :logger

    # workers: thread count; queues: Array of named queues (nil: all); parallel: also run tasks
    # without a queue; lease/heartbeat: seconds; max_lost: lost runs (dead dispatchers) before a
    # task is aborted (default 5); retry_base: seconds before a failed task's first retry, doubled
    # per attempt (default 1); verbose: log every task, not only failures.
    def initialize(workers: 10, queues: nil, parallel: true, lease: nil, heartbeat: nil, max_lost: nil, name: nil,
                   retry_base: nil, logger: Logger.new($stdout), verbose: false)
      raise QueueDispatcher.invalid('workers', "#{workers.inspect} is not a positive Integer") unless workers.is_a?(Integer) && workers.positive?

      @workers = workers
      @opts = { workers: workers, queues: queues&.map(&:to_s), parallel: parallel, name: name, max_lost: max_lost,
                retry_base: retry_base&.to_f }
      if lease
        @opts[:lease] = lease.to_f
        @opts[:heartbeat] = (heartbeat || [1.0, lease.to_f / 5].min).to_f
      elsif heartbeat
        @opts[:heartbeat] = heartbeat.to_f
      end
      @logger = logger
      @verbose = verbose
      @threads = []
    end

    def start
      @dispatcher = Native::Dispatcher.start(QueueDispatcher.store, @opts.compact)
      @threads = Array.new(@workers) { |i| spawn_worker(i) }
      self
    end

    # Replaces worker threads that died while the dispatcher still claims; returns how many.
    def revive
      return 0 unless @dispatcher

      dead = @threads.each_index.reject { |i| @threads[i].alive? }
      dead.each do |i|
        @logger&.error("worker qd-worker-#{i} died; starting a new one")
        @threads[i] = spawn_worker(i)
      end
      dead.size
    end

    # Tasks claimed and not yet reported.
    def running = @dispatcher ? @dispatcher.running : 0

    def alive_threads = @threads.count(&:alive?)

    # First half of a graceful stop: claim nothing more (waiting workers return).
    def stop_claiming
      @dispatcher&.stop_claiming
    end

    # Graceful stop: no more claims, running tasks get up to `grace` seconds to finish, then
    # the engine leaves (unfinished runs go back to `new` for another dispatcher).
    # Returns true if every worker finished in time.
    def stop(grace: 30)
      return true unless @dispatcher

      stop_claiming
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + grace
      finished = @threads.all? do |t|
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        t.join([left, 0].max)
      end
      shutdown_now
      finished
    end

    # Leaves at once: unfinished runs are released as lost (recovered by the next dispatcher).
    def shutdown_now
      d = @dispatcher
      return unless d

      d.shutdown(0)
      @dispatcher = nil
    end

    private

    def spawn_worker(index)
      Thread.new(@dispatcher.worker) do |w|
        Thread.current.name = "qd-worker-#{index}"
        Thread.current.report_on_exception = false
        work(w)
      end
    end

    def work(w)
      claimed = nil
      Thread.current[:queue_dispatcher_context] = Context.new(w)
      loop do
        claimed ||= w.claim(nil)
        next unless claimed

        if claimed.kind == :on_error
          run_error_callbacks(claimed)
          claimed = nil
          next
        end
        claimed = run(w, claimed)
        break if claimed == :stopped
      end
    rescue StoppedError
      nil
    rescue Exception => e # rubocop:disable Lint/RescueException -- a dying worker is always logged
      @logger&.error("worker #{Thread.current.name} died: #{e.class}: #{e.message}")
      raise
    end

    # Runs one task; returns the next claimed task (nil or :stopped when none).
    def run(w, claimed)
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      job = nil
      reported = false
      job, result, error, message = execute(w, claimed) { |k| job = k }
      w.progress(claimed, message, nil) if message
      log(claimed, error, started)
      if job&.queue_dispatcher_callbacks?
        reported = true
        settled = w.complete(claimed, result, error)
        run_callbacks(job, claimed.id, settled)
        nil
      else
        reported = true
        settled, following = w.complete_and_claim(claimed, result, error, nil)
        @logger&.error("task #{claimed.id}: outcome refused: #{settled.message}") if settled.is_a?(Exception)
        following
      end
    rescue StoppedError
      :stopped
    ensure
      # Only when the thread is being killed (or raised into) while the code ran: store that.
      unless reported
        why = $ERROR_INFO ? error_triple($ERROR_INFO) : ['Interrupted', 'the worker thread was killed while the task ran', []]
        begin
          w.complete(claimed, nil, why)
        rescue Error
          nil
        end
      end
    end

    # Returns [job_class, result_json, error_triple, message].
    def execute(w, claimed)
      klass, meth, kind = Registry.resolve(claimed.target)
      yield klass
      ctx = Thread.current[:queue_dispatcher_context]
      ctx.running(claimed)
      value = wrap_executor do
        receiver = kind == :class ? klass : find_receiver(klass, claimed.receiver)
        receiver.task_id = claimed.id if receiver.respond_to?(:task_id=)
        text = claimed.args
        if text == NO_ARGS
          receiver.public_send(meth)
        else
          args, kwargs = decode_args(text)
          if kwargs.nil? || kwargs.empty?
            receiver.public_send(meth, *args)
          else
            receiver.public_send(meth, *args, **kwargs.transform_keys(&:to_sym))
          end
        end
      end
      value.nil? ? [klass, NULL, nil, nil] : [klass, *outcome(value)]
    rescue StandardError, ScriptError, SystemStackError, NoMemoryError => e
      [klass, nil, error_triple(e), nil]
    ensure
      ctx&.running(nil)
    end

    # The stored `{"args": [...], "kwargs": {...}}`; a row written by other means may hold
    # anything, and the task then fails with a message that says so.
    def decode_args(text)
      payload = begin
        JSON.parse(text)
      rescue JSON::ParserError => e
        raise QueueDispatcher.invalid('args', "cannot decode the stored arguments (not JSON): #{e.message[0, 200]}")
      end
      args = payload.is_a?(Hash) ? (payload['args'] || []) : nil
      kwargs = payload.is_a?(Hash) ? payload['kwargs'] : nil
      unless args.is_a?(Array) && (kwargs.nil? || kwargs.is_a?(Hash))
        raise QueueDispatcher.invalid('args', 'cannot decode the stored arguments: expected {"args": [...], "kwargs": {...}}')
      end

      [args, kwargs]
    end

    def find_receiver(klass, receiver_json)
      raise QueueDispatcher.invalid('receiver', "#{klass}: an instance task needs a receiver id") unless receiver_json

      klass.find(JSON.parse(receiver_json, quirks_mode: true))
    end

    # The original gem's outcome conventions. Returns [result_json, error_triple, message].
    def outcome(value)
      rc_style = value.respond_to?(:rc) && value.respond_to?(:output) && value.respond_to?(:error_msg)
      if rc_style || (value.is_a?(Hash) && (value.key?(:rc) || value.key?('rc')))
        rc, output, error_msg = if rc_style
                                  [value.rc, value.output, value.error_msg]
                                else
                                  [value.fetch(:rc) { value['rc'] }, value[:output] || value['output'], value[:error_msg] || value['error_msg']]
                                end
        ok = value.respond_to?(:successful?) ? value.successful? : (rc.nil? || rc.to_i.zero?)
        message = output&.to_s
        if ok
          [lenient_json({ 'rc' => rc, 'output' => output, 'error_msg' => error_msg }), nil, message]
        else
          [nil, ['RcError', error_msg ? error_msg.to_s : "rc #{rc}", []], message]
        end
      elsif value.respond_to?(:successful?) && !value.is_a?(Task)
        if value.successful?
          [lenient_json(value), nil, nil]
        else
          text = value.respond_to?(:error_msg) && value.error_msg ? value.error_msg.to_s : "#{value.class} reported failure"
          [nil, [value.class.name.to_s, text, []], nil]
        end
      elsif value.is_a?(Task)
        [Native.dump_json({ 'task_id' => value.id }, 'result'), nil, nil]
      else
        json, note = lenient_json_with_note(value)
        [json, nil, note]
      end
    end

    def lenient_json(value) = lenient_json_with_note(value).first

    # A value that cannot be stored as JSON is stored as its text, and the message says so.
    def lenient_json_with_note(value)
      [Native.dump_json(value, 'result'), nil]
    rescue InvalidInputError => e
      [JSON.generate(value.inspect), "result stored as text: #{e.message}"]
    end

    def error_triple(e)
      [e.class.name.to_s, e.message.to_s, Array(e.backtrace)]
    end

    # Under Rails, task code runs as Rails expects of background work: inside the reloader
    # (which runs the executor: connection pool check-in, query cache, code reloading in
    # development), or the executor alone where there is no reloader.
    def wrap_executor(&block)
      app = defined?(::Rails) && ::Rails.respond_to?(:application) && ::Rails.application
      return yield unless app

      app.respond_to?(:reloader) ? app.reloader.wrap(&block) : app.executor.wrap(&block)
    end

    def run_callbacks(job, id, settled)
      case settled
      when :successful then callbacks(job, :success, id)
      when :error, :aborted then callbacks(job, :error, id)
      end
    end

    def run_error_callbacks(claimed)
      job, = Registry.resolve(claimed.target)
      callbacks(job, :error, claimed.id, claimed.to_h)
    rescue InvalidInputError => e
      @logger&.warn("task #{claimed.id}: no on_error callback to run: #{e.message}")
    end

    def callbacks(job, kind, id, attributes = nil)
      return unless job.respond_to?(:queue_dispatcher_callbacks)

      job.queue_dispatcher_callbacks(kind).each do |cb|
        task = attributes ? Task.new(id, attributes) : Task.find(id)
        wrap_executor { cb.is_a?(Proc) ? cb.call(task) : job.public_send(cb, task) }
      rescue Exception => e # rubocop:disable Lint/RescueException -- a failing callback changes nothing
        @logger&.error("task #{id}: on_#{kind} callback #{cb.inspect} failed: #{e.class}: #{e.message}")
      end
    end

    def log(claimed, error, started)
      return unless @logger
      return unless error || @verbose

      ms = ((Process.clock_gettime(Process::CLOCK_MONOTONIC) - started) * 1000).round(1)
      if error
        @logger.warn("task #{claimed.id} #{claimed.target} failed after #{ms} ms: #{error[0]}: #{error[1]}")
      else
        @logger.info("task #{claimed.id} #{claimed.target} done in #{ms} ms")
      end
    end
  end
end
