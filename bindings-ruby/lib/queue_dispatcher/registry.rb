# frozen_string_literal: true

require 'set'

module QueueDispatcher
  # The security gate (DESIGN.md "Security"): the database names what to run, so a stored target
  # resolves only by exact-string lookups here, never by const_get or send along the row's text.
  # A class is known only if it opted in (`include QueueDispatcher::Job`); a method only if it
  # is public and defined in that class's own body (singleton methods for `Const.method`,
  # instance methods for `Const#method`) or listed with `task_methods`, and never a method of
  # Object, Kernel, BasicObject, Module or Class. Enqueue applies the same check.
  # Thread-safe: read by worker threads, written when classes load.
  module Registry
    # Every method Object, Kernel, BasicObject, Module and Class have, public or not: a row may
    # never name one, even if a job class redefines it.
    FORBIDDEN = [Object, Kernel, BasicObject, Module, Class].flat_map do |m|
      m.public_instance_methods + m.private_instance_methods + m.protected_instance_methods +
        m.singleton_class.public_instance_methods + m.singleton_class.private_instance_methods
    end.map(&:to_s).to_set.freeze

    @classes = {}
    @resolved = {}
    @lock = Mutex.new

    class << self
      # @api private: called when a class includes QueueDispatcher::Job (or inherits from one).
      def register(klass)
        name = klass.name
        return unless name # anonymous: registered on first enqueue, once it has a name

        @lock.synchronize do
          @classes = @classes.merge(name => klass).freeze
          @resolved = {}.freeze # a reloaded class replaces the old one: forget what was resolved
        end
      end

      # The class registered under exactly this name, or nil.
      def job_class(name)
        @classes[name]
      end

      def job_classes
        @classes.values
      end

      # Is `name` a task method of `klass` (`kind` :class or :instance)? Returns its Symbol.
      def task_method(klass, name, kind)
        name = name.to_s
        return nil if name.start_with?('_') || FORBIDDEN.include?(name)

        owned = kind == :class ? klass.singleton_class : klass
        sym = owned.public_method_defined?(name) ? name.to_sym : nil
        return nil unless sym

        listed = klass.instance_variable_get(:@queue_dispatcher_task_methods)
        own = owned.public_instance_methods(false).include?(sym)
        own || listed&.include?(sym) ? sym : nil
      end

      # Resolves a stored target to [class, method Symbol, :class | :instance], or raises
      # InvalidInputError naming what is unknown. Nothing is looked up by constant path or sent
      # by name: both parts must match registry entries exactly.
      def resolve(target)
        @resolved[target] || remember(target, lookup(target))
      end

      private

      def remember(target, entry)
        @lock.synchronize { @resolved = @resolved.merge(target.dup.freeze => entry.freeze).freeze }
        entry
      end

      def lookup(target)
        sep = target.index(/[.#]/)
        raise QueueDispatcher.invalid('target', "#{target.inspect} is not \"Const.method\" or \"Const#method\"") unless sep

        const = target[0, sep]
        kind = target[sep] == '.' ? :class : :instance
        meth = target[(sep + 1)..]
        klass = @classes[const]
        unless klass
          raise QueueDispatcher.invalid('target', "#{target.inspect}: #{const} is not a registered job class " \
                                                  '(it must include QueueDispatcher::Job and be loaded by the dispatcher, e.g. with -r)')
        end
        sym = task_method(klass, meth, kind)
        unless sym
          raise QueueDispatcher.invalid('target', "#{target.inspect}: #{meth} is not a task method of #{const} " \
                                                  '(public, defined in the class body or listed with task_methods; never a method of Object/Kernel/BasicObject/Module/Class)')
        end
        [klass, sym, kind]
      end
    end
  end
end
