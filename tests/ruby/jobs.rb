# frozen_string_literal: true

# Job classes the Ruby tests enqueue and the dispatcher under test loads (`-r jobs.rb`). They
# report what they did by appending lines to $QD_TEST_LOG, so tests in another process see it.
require 'queue_dispatcher'

module TestLog
  def self.write(line)
    path = ENV.fetch('QD_TEST_LOG', nil)
    return unless path

    File.open(path, 'a') { |f| f.puts(line) } # O_APPEND: one write per line, safe across processes
  end

  def self.lines(path = ENV.fetch('QD_TEST_LOG'))
    File.exist?(path) ? File.readlines(path, chomp: true) : []
  end
end

class LongRunningMailJob
  include QueueDispatcher::Job

  def self.send_mail(to = nil, subject: nil)
    TestLog.write("send_mail #{QueueDispatcher.current_task&.id} #{to.inspect} #{subject.inspect}")
    "mail to #{to}"
  end

  def self.echo(*args, **kwargs)
    { 'args' => args, 'kwargs' => kwargs.transform_keys(&:to_s), 'classes' => (args + kwargs.values).map { |a| a.class.name } }
  end
end

# Serial-queue and shutdown tests: logs start and end with the task id.
class StepJob
  include QueueDispatcher::Job

  def self.step(seconds = 0.05)
    id = QueueDispatcher.current_task.id
    TestLog.write("start #{id}")
    sleep seconds
    TestLog.write("end #{id}")
    id
  end

  # Sleeps until the marker file exists (SIGKILL test: the second run finds it and returns).
  def self.once(marker, seconds = 60)
    id = QueueDispatcher.current_task.id
    if File.exist?(marker)
      TestLog.write("rerun #{id}")
      return 'second run'
    end
    File.write(marker, 'x')
    TestLog.write("start #{id}")
    deadline = Time.now + seconds
    sleep 0.02 while Time.now < deadline && !QueueDispatcher.cancelled?
    'first run'
  end

  # Polls the cancellation flag (cancel, reset, timeout) like a well-behaved long task.
  def self.until_cancelled(limit = 10)
    TestLog.write("start #{QueueDispatcher.current_task.id}")
    deadline = Time.now + limit
    sleep 0.01 until QueueDispatcher.cancelled? || Time.now > deadline
    TestLog.write("stopped #{QueueDispatcher.current_task.id} #{QueueDispatcher.cancelled?.inspect}")
    'stopped'
  end
end

class FailJob
  include QueueDispatcher::Job

  def self.boom(message = 'boom')
    TestLog.write("boom #{QueueDispatcher.current_task.id}")
    raise ArgumentError, message
  end
end

# The original gem's outcome conventions.
class OutcomeJob
  include QueueDispatcher::Job

  Verdict = Struct.new(:ok, :error_msg) do
    def successful? = ok
  end

  attr_accessor :task_id

  def self.good_rc = QueueDispatcher::RcAndMsg.good_rc('all fine')
  def self.bad_rc = QueueDispatcher::RcAndMsg.bad_rc('disk full', output: 'partial output')
  def self.hash_rc(rc) = { rc: rc, output: "rc was #{rc}", error_msg: rc.zero? ? nil : 'nonzero' }
  def self.verdict(ok) = Verdict.new(ok, ok ? nil : 'verdict says no')
  def self.not_json = Time.at(0).utc
  def self.value = { 'n' => 1, :sym => [1.5, nil, true] }

  def self.progress
    QueueDispatcher.update_message(msg: 'half way', perc_finished: 50)
    TestLog.write("progress #{QueueDispatcher.current_task.id}")
    sleep 0.4
    update_message(msg: 'almost', perc_finished: 90)
    sleep 0.3
    'done'
  end

  class << self
    attr_accessor :last_task_id
  end

  def self.task_id=(id)
    self.last_task_id = id
  end

  def self.show_task_id = last_task_id
end

# ActiveRecord-style records: stored as class + id, found again with .find.
class Report
  include QueueDispatcher::Job

  attr_reader :id
  attr_accessor :task_id

  def self.find(id)
    raise ArgumentError, "no report #{id}" unless id.is_a?(Integer) && id.positive?

    new(id)
  end

  def initialize(id)
    @id = id
  end

  def build(format, pages: 1)
    "report #{id} as #{format}, #{pages} pages, task #{task_id}"
  end

  def helper_from_module = 'never'
end

# Callbacks declared on the job class.
class CallbackJob
  include QueueDispatcher::Job

  on_success :record_success
  on_error { |task| TestLog.write("on_error #{task.id} #{task.reload.error[:class]}") }

  def self.ok = 'fine'
  def self.broken = raise('callback test failure')

  def self.record_success(task)
    TestLog.write("on_success #{task.id} #{task.reload.state}")
  end
end

module Listed
  def from_module = 'listed via task_methods'
  def unlisted_from_module = 'not a task'
end

# Lists a method that is not defined in its own body.
class ListingJob
  extend Listed
  include QueueDispatcher::Job

  task_methods :from_module
end

# Not a job class: never runs, whatever a row says.
class PlainClass
  def self.run = TestLog.write('PlainClass ran')
end

# Rails executor test: a task must run inside Rails.application.executor when Rails is loaded.
class ExecutorJob
  include QueueDispatcher::Job

  def self.inside = Thread.current[:fake_rails_executor] ? 'inside executor' : 'outside executor'
end

class BenchJob
  include QueueDispatcher::Job

  def self.noop(*) = nil
end

# Modules opt in the same way (module methods are the tasks).
module MaintenanceJobs
  include QueueDispatcher::Job

  def self.vacuum(table) = "vacuumed #{table}"
end

# Kills the worker thread that runs it (the dispatcher must replace that thread).
class RudeJob
  include QueueDispatcher::Job

  def self.kill_my_thread = Thread.current.kill
end
