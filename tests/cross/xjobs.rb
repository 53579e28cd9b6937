# frozen_string_literal: true

# Ruby tasks of the cross-language suites (tests/cross): the Python twin is xjobs.py. Every run
# appends a start and an end record to a per-process log under $QD_XLOG_DIR, with
# CLOCK_MONOTONIC microseconds, comparable across processes.
require 'queue_dispatcher'

class XJob
  include QueueDispatcher::Job

  LOCK = Mutex.new

  def self.stamp(label, ms: 20)
    run(label, ms, fail: false)
  end

  def self.fail_now(label, ms: 5)
    run(label, ms, fail: true)
  end

  class << self
    private

    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC, :microsecond)

    def log(kind, extra = '')
      dir = ENV.fetch('QD_XLOG_DIR', nil)
      return if dir.nil? || dir.empty?

      line = "#{kind} #{QueueDispatcher.current_task.id} #{now} #{Process.pid} #{extra}\n"
      LOCK.synchronize do
        @log ||= File.open(File.join(dir, "ruby-#{Process.pid}.log"), File::WRONLY | File::CREAT | File::APPEND).tap { |f| f.sync = true }
        @log.syswrite(line)
      end
    end

    def run(label, ms, fail:)
      log('S')
      start = now
      sleep(ms / 1000.0)
      finish = now
      if fail
        log('E', 'fail')
        raise "#{label}: designed to fail"
      end
      log('E', 'ok')
      { runtime: 'ruby', pid: Process.pid, label: label, start: start, end: finish }
    end
  end
end

# The original gem's example class, registered so that rows naming its inherited methods
# (`LongRunningMailJob.class_eval`) reach the method check, not only the class check.
class LongRunningMailJob
  include QueueDispatcher::Job

  def self.send_mail(to = nil)
    "sent to #{to}"
  end
end
