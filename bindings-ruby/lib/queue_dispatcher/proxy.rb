# frozen_string_literal: true

module QueueDispatcher
  # Enqueue options, checked once per `enqueue(...)` call and handed to the engine as plain
  # values: queue (String), priority (Integer, lower first), depends_on (Task/id/Array),
  # run_at (Time) or delay (seconds), retries, timeout (seconds), unique_key, meta (Hash).
  module Options
    KEYS = %i[queue priority depends_on run_at delay retries timeout unique_key meta].freeze

    def self.normalize(opts)
      return nil if opts.empty?

      out = {}
      opts.each do |key, value|
        case key
        when :queue then out[:queue] = value&.to_s
        when :priority then out[:priority] = integer(:priority, value)
        when :retries then out[:retries] = integer(:retries, value)
        when :unique_key then out[:unique_key] = value&.to_s
        when :meta
          raise QueueDispatcher.invalid('meta', "must be a Hash, not #{value.class}") unless value.nil? || value.is_a?(Hash)

          out[:meta] = value
        when :timeout
          out[:timeout] = value.nil? ? nil : number(:timeout, value)
        when :depends_on
          out[:depends_on] = Array(value).map { |t| t.is_a?(Task) ? t.id : integer(:depends_on, t) }
        when :run_at
          out[:run_at] = micros(value)
        when :delay
          out[:run_at] = micros(Time.now) + (number(:delay, value) * 1_000_000).round unless value.nil?
        else
          raise QueueDispatcher.invalid('options', "unknown enqueue option #{key.inspect} (known: #{KEYS.join(', ')})")
        end
      end
      out.freeze
    end

    def self.integer(name, value)
      return value if value.is_a?(Integer)

      raise QueueDispatcher.invalid(name, "#{value.inspect} is not an Integer")
    end

    def self.number(name, value)
      return value.to_f if value.is_a?(Numeric)

      raise QueueDispatcher.invalid(name, "#{value.inspect} is not a number of seconds")
    end

    def self.micros(value)
      case value
      when nil then nil
      when Time then (value.to_r * 1_000_000).to_i
      when Numeric then (value.to_r * 1_000_000).to_i # seconds since the epoch
      else
        raise QueueDispatcher.invalid(:run_at, "#{value.inspect} is not a Time") unless value.respond_to?(:to_time)

        (value.to_time.to_r * 1_000_000).to_i
      end
    end
  end

  # What `X.enqueue(...)` returns: the next method called on it is stored as a task instead of
  # running. Inherits from BasicObject so (almost) every method name reaches method_missing.
  class Proxy < BasicObject
    def initialize(klass, receiver, options)
      @klass = klass
      @receiver = receiver
      @options = options
    end

    def method_missing(name, *args, **kwargs, &block)
      ::QueueDispatcher::Enqueue.call(@klass, @receiver, name, args, kwargs, @options, block)
    end

    def respond_to_missing?(_name, _include_private = false) = true

    def inspect = "#<QueueDispatcher::Proxy #{@klass}#{@receiver ? '#' : '.'}...>"
  end

  # @api private: the enqueue path shared by every proxy.
  module Enqueue
    @targets = {}

    class << self
      def call(klass, receiver, name, args, kwargs, options, block)
        raise QueueDispatcher.invalid('block', "#{name}: a block cannot be stored in a task") if block

        target = target_for(klass, name, receiver ? :instance : :class)
        receiver_json = receiver && receiver_id(receiver)
        id = QueueDispatcher.store.enqueue(target, receiver_json, args, kwargs, options)
        Task.new(id)
      end

      private

      # "Const.method" / "Const#method", checked against the registry once per name.
      def target_for(klass, name, kind)
        per_class = @targets[klass]
        target = per_class && per_class[kind]&.[](name)
        return target if target

        const = klass.name or raise QueueDispatcher.invalid('target', "#{klass.inspect} is anonymous: a job class needs a constant name")
        Registry.register(klass) unless Registry.job_class(const).equal?(klass)
        unless Registry.task_method(klass, name, kind)
          raise QueueDispatcher.invalid('target', "#{const}#{kind == :class ? '.' : '#'}#{name}: not a task method of #{const} " \
                                                  '(public, defined in the class body or listed with task_methods; never a method of Object/Kernel/BasicObject/Module/Class)')
        end
        target = "#{const}#{kind == :class ? '.' : '#'}#{name}"
        Native.validate_target(target)
        target.freeze
        @targets = @targets.merge(klass => { class: {}, instance: {} }) unless @targets[klass]
        @targets[klass][kind] = @targets[klass][kind].merge(name => target)
        target
      end

      # Instances are stored as class + id and found again with `Const.find(id)`.
      def receiver_id(obj)
        unless obj.respond_to?(:id) && obj.class.respond_to?(:find)
          raise QueueDispatcher.invalid('receiver', "#{obj.class} instances are stored as class + id: the object must respond to #id " \
                                                    'and its class to .find(id) (ActiveRecord-style); objects are never serialized')
        end
        id = obj.id
        raise QueueDispatcher.invalid('receiver', "#{obj.class} instance has no id (save it first)") if id.nil?

        Native.dump_json(id, 'receiver')
      end
    end
  end
end
