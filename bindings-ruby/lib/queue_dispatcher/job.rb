# frozen_string_literal: true

module QueueDispatcher
  # Opting in: `include QueueDispatcher::Job` makes a class a job class. Its public methods
  # defined in its own body become tasks (singleton methods as `Const.method`, instance methods
  # as `Const#method` on records found again with `Const.find(id)`), plus any it lists with
  # `task_methods`. It gains `enqueue(...)`, `on_success` / `on_error` callbacks and
  # `update_message`.
  module Job
    def self.included(base)
      base.extend(ClassMethods)
      Registry.register(base)
    end

    module ClassMethods
      # `LongRunningMailJob.enqueue(queue: 'mail').send_mail(...)` stores the call as a task and
      # returns it (a QueueDispatcher::Task). Options: see QueueDispatcher::Options.
      def enqueue(**options)
        Proxy.new(self, nil, Options.normalize(options))
      end

      # Lists methods as tasks that are not defined in this class's own body (e.g. from a
      # module or a parent class). Methods of Object/Kernel/BasicObject/Module/Class never are.
      def task_methods(*names)
        list = (@queue_dispatcher_task_methods ||= Set.new)
        names.flatten.each do |n|
          if Registry::FORBIDDEN.include?(n.to_s) || n.to_s.start_with?('_')
            raise QueueDispatcher.invalid('task_methods', "#{n} can never be a task method")
          end

          list << n.to_sym
        end
        list
      end

      # Callbacks after a terminal outcome, in the dispatcher: a method name (called on this
      # class with the Task) or a block (called with the Task). on_error also runs for aborted
      # tasks and tasks whose dependency failed. A failing callback is logged and changes nothing.
      def on_success(*method_names, &block)
        queue_dispatcher_callbacks(:success).concat(method_names.map(&:to_sym))
        queue_dispatcher_callbacks(:success) << block if block
      end

      def on_error(*method_names, &block)
        queue_dispatcher_callbacks(:error).concat(method_names.map(&:to_sym))
        queue_dispatcher_callbacks(:error) << block if block
      end

      # @api private
      def queue_dispatcher_callbacks(kind)
        @queue_dispatcher_callbacks ||= { success: [], error: [] }
        @queue_dispatcher_callbacks[kind]
      end

      # @api private
      def queue_dispatcher_callbacks?
        @queue_dispatcher_callbacks && @queue_dispatcher_callbacks.values.any? { |l| !l.empty? }
      end

      def update_message(msg: nil, perc_finished: nil)
        QueueDispatcher.update_message(msg: msg, perc_finished: perc_finished)
      end

      def inherited(sub)
        super
        Registry.register(sub)
      end
    end

    # `record.enqueue.deliver` (the record is stored as class + id).
    def enqueue(**options)
      Proxy.new(self.class, self, Options.normalize(options))
    end

    def update_message(msg: nil, perc_finished: nil)
      QueueDispatcher.update_message(msg: msg, perc_finished: perc_finished)
    end
  end
end
