# frozen_string_literal: true

# Running tasks in-process with QueueDispatcher::Runner: registry resolution, outcome
# conventions, progress, task_id, callbacks, retries, cancellation and timeouts.
require_relative '../../tests/ruby/test_helper'
require 'logger'
require 'stringio'

class RunnerTest < Minitest::Test
  include QDTestHelpers

  def setup
    super
    @out = StringIO.new
    @runner = QueueDispatcher::Runner.new(workers: 3, logger: Logger.new(@out), lease: 3).start
  end

  def teardown
    @runner&.stop(grace: 5)
    super
  end

  def done(task, timeout = 10)
    task.wait(timeout)
    assert task.executed?, "task #{task.id} finished (#{task.state})"
    task
  end

  def test_return_values_are_results
    t = done(LongRunningMailJob.enqueue.send_mail('a@b.c', subject: :hi))
    assert t.successful?
    assert_equal 'mail to a@b.c', t.result
    assert_includes log_lines, "send_mail #{t.id} \"a@b.c\" \"hi\""
    t = done(LongRunningMailJob.enqueue.echo(1, :two, [3.5], k: { 'n' => nil }))
    assert_equal({ 'args' => [1, 'two', [3.5]], 'kwargs' => { 'k' => { 'n' => nil } }, 'classes' => %w[Integer String Array Hash] }, t.result)
    assert_equal({ 'n' => 1, 'sym' => [1.5, nil, true] }, done(OutcomeJob.enqueue.value).result)
  end

  def test_modules_are_job_classes_too
    t = done(MaintenanceJobs.enqueue(queue: 'maint').vacuum(:users))
    assert_equal ['MaintenanceJobs.vacuum', 'vacuumed users'], [t.target, t.result]
  end

  def test_outcome_conventions
    t = done(OutcomeJob.enqueue.good_rc)
    assert t.successful?
    assert_equal 'all fine', t.message
    t = done(OutcomeJob.enqueue.bad_rc)
    assert t.error?
    assert_equal %w[RcError disk\ full], [t.error[:class], t.error[:message]]
    assert_equal 'partial output', t.message
    assert done(OutcomeJob.enqueue.hash_rc(0)).successful?
    t = done(OutcomeJob.enqueue.hash_rc(3))
    assert t.error?
    assert_equal 'nonzero', t.error[:message]
    assert done(OutcomeJob.enqueue.verdict(true)).successful?
    t = done(OutcomeJob.enqueue.verdict(false))
    assert_equal ['OutcomeJob::Verdict', 'verdict says no'], [t.error[:class], t.error[:message]]
    t = done(OutcomeJob.enqueue.not_json)
    assert t.successful?
    assert_equal '1970-01-01 00:00:00 UTC', t.result
    assert_match(/stored as text/, t.message)
  end

  def test_exceptions_are_errors_with_class_message_backtrace
    t = done(FailJob.enqueue.boom('bad input'))
    assert t.error?
    assert_equal %w[ArgumentError bad\ input], [t.error[:class], t.error[:message]]
    assert(t.error[:backtrace].any? { |l| l.include?('jobs.rb') })
    assert_equal 'ArgumentError: bad input', t.error_msg
  end

  def test_retries_keep_the_error_history
    runner = @runner
    runner.stop(grace: 1)
    @runner = QueueDispatcher::Runner.new(workers: 1, logger: Logger.new(@out)).start
    t = FailJob.enqueue(retries: 1).boom
    done(t, 20)
    assert t.error?
    assert_equal 2, t.attempts
    assert_equal 2, t.error_history.size
  end

  def test_progress_is_visible_while_running
    t = OutcomeJob.enqueue.progress
    wait_until(5, 'progress') { (t.reload.message == 'half way') }
    assert t.running?
    assert_equal 50.0, t.perc_finished
    done(t)
    assert_equal 'almost', t.message
    assert_equal 90.0, t.perc_finished
    assert_raises(QueueDispatcher::Error) { QueueDispatcher.update_message(msg: 'outside') }
  end

  def test_task_id_is_handed_to_receivers
    t = done(OutcomeJob.enqueue.show_task_id)
    assert_equal t.id, t.result
    r = done(Report.new(7).enqueue.build('pdf', pages: 2))
    assert_equal "report 7 as pdf, 2 pages, task #{r.id}", r.result
    bad = done(Report.new(-1).enqueue.build('pdf'))
    assert bad.error?
    assert_match(/no report -1/, bad.error[:message])
  end

  def test_callbacks
    ok = done(CallbackJob.enqueue.ok)
    bad = done(CallbackJob.enqueue.broken)
    wait_until(5, 'callbacks') { log_lines.include?("on_error #{bad.id} RuntimeError") }
    assert_includes log_lines, "on_success #{ok.id} successful"
    dep = CallbackJob.enqueue(depends_on: bad).ok
    done(dep)
    assert_equal 'DependencyFailed', dep.error[:class]
    assert_match(/#{bad.id}/, dep.error[:message])
    wait_until(5, 'on_error of the dependent') { log_lines.include?("on_error #{dep.id} DependencyFailed") }
  end

  def test_cancel_and_timeout_raise_the_flag
    t = StepJob.enqueue.until_cancelled
    wait_until(5, 'start') { log_lines.include?("start #{t.id}") }
    t.cancel
    done(t)
    assert t.aborted?
    assert_includes log_lines, "stopped #{t.id} :cancelled"
    t = done(StepJob.enqueue(timeout: 0.3).until_cancelled)
    assert t.error?
    assert_equal 'Timeout', t.error[:class]
  end

  def test_rows_the_registry_refuses_end_in_error
    store
    targets = %w[Kernel#system LongRunningMailJob.class_eval LongRunningMailJob.instance_eval Object.const_get
                 NoSuchClass.run PlainClass.run ListingJob.unlisted_from_module Report#instance_variable_get]
    ids = targets.map do |target|
      args = target == 'Kernel#system' ? %(["touch #{@dir}/pwned"]) : '["x"]'
      sqlite("INSERT INTO tasks (runtime, target, receiver, run_at, enqueued_at, args) VALUES ('ruby', '#{target}', '1', #{NOW_SQL}, #{NOW_SQL}, '{\"args\":#{args},\"kwargs\":{}}') RETURNING id;").to_i
    end
    ids.each_with_index do |id, i|
      t = done(QueueDispatcher::Task.new(id))
      assert t.error?, "#{targets[i]} -> #{t.state}"
      assert_equal 'QueueDispatcher::InvalidInputError', t.error[:class]
    end
    refute File.exist?(File.join(@dir, 'pwned'))
    refute_includes log_lines, 'PlainClass ran'
    assert_equal 'listed via task_methods', done(ListingJob.enqueue.from_module).result
  end

  def test_thread_kill_of_a_running_task_is_stored
    t = StepJob.enqueue.until_cancelled(30)
    wait_until(5, 'start') { log_lines.include?("start #{t.id}") }
    worker = Thread.list.find { |th| th.name&.start_with?('qd-worker') && th[:queue_dispatcher_context]&.claimed&.id == t.id }
    assert worker
    worker.kill
    assert worker.join(2)
    done(t)
    assert_equal 'Interrupted', t.error[:class]
  end
end
