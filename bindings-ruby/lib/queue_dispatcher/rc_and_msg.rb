# frozen_string_literal: true

module QueueDispatcher
  # The original gem's return-code convention: a task returning an object that responds to rc,
  # output and error_msg succeeds when rc is 0 (or nil); output becomes the task's message.
  class RcAndMsg
    attr_accessor :rc, :output, :error_msg

    def self.good_rc(output = '', args = {})
      new.good_rc(output, args)
    end

    def self.bad_rc(error_msg, args = {})
      new.bad_rc(error_msg, args)
    end

    def initialize(args = {})
      @rc = args[:rc]&.to_i
      @output = args[:output]
      @error_msg = args[:error_msg]
    end

    def good_rc(output, args = {})
      @rc = 0
      @output = output
      @error_msg = args[:error_msg]
      self
    end

    def bad_rc(error_msg, args = {})
      @rc = 999
      @output = args[:output]
      @error_msg = error_msg
      self
    end

    def +(other)
      sum = clone
      sum.rc = rc.to_i + other.rc.to_i
      sum.output = [output, other.output].compact.reject(&:empty?).join("\n") if other.output && !other.output.empty?
      sum.error_msg = [error_msg, other.error_msg].compact.reject(&:empty?).join("\n") if other.error_msg && !other.error_msg.empty?
      sum
    end

    def to_hash
      { rc: @rc, output: @output, error_msg: @error_msg }
    end
    alias to_h to_hash
  end
end
