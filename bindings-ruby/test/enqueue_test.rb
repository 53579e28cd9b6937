# frozen_string_literal: true

# The enqueue API: the original vocabulary, options, receivers, JSON arguments, batches and the
# Task object (QueueDispatcher::Proxy, Options, Task).
require_relative '../../tests/ruby/test_helper'

class EnqueueTest < Minitest::Test
  include QDTestHelpers

  def test_original_vocabulary_stores_targets_and_arguments
    task = LongRunningMailJob.enqueue.send_mail
    assert_kind_of QueueDispatcher::Task, task
    assert_equal 'LongRunningMailJob.send_mail', task.target
    assert_nil task.queue
    assert task.new? && task.pending? && !task.executed?
    task = LongRunningMailJob.enqueue(queue: 'queue_name').send_mail('a@b.c', subject: 'hi')
    assert_equal 'queue_name', task.queue
    assert_equal({ 'args' => ['a@b.c'], 'kwargs' => { 'subject' => 'hi' } }, task.args)
    assert_equal 100, task.priority
  end

  def test_options
    dep = LongRunningMailJob.enqueue.send_mail
    at = Time.now + 3600
    t = LongRunningMailJob.enqueue(priority: 5, depends_on: dep, run_at: at, retries: 2, timeout: 1.5,
                                   unique_key: 'k1', meta: { user: 7 }).send_mail
    assert_equal [5, 2, 'k1', { 'user' => 7 }, [dep]], [t.priority, t.retries, t.unique_key, t.meta, t.dependent_tasks]
    assert_in_delta at.to_f, t.run_at.to_f, 0.001
    assert_equal 1.5, t.attributes[:timeout]
    assert_equal t, LongRunningMailJob.enqueue(unique_key: 'k1').send_mail, 'unfinished holder of a unique_key is returned'
    d = LongRunningMailJob.enqueue(delay: 60).send_mail
    assert_in_delta Time.now.to_f + 60, d.run_at.to_f, 2
    e = assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue(bogus: 1) }
    assert_match(/bogus/, e.message)
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue(priority: 'high') }
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue(meta: [1]) }
    assert_equal [t], QueueDispatcher.tasks(meta: { user: 7 })
  end

  def test_non_json_arguments_are_refused_naming_them
    e = assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.send_mail(Time.now) }
    assert_match(/args\[0\].*Time.*not JSON/, e.message)
    e = assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.send_mail('x', subject: Object.new) }
    assert_match(/kwargs\[:subject\].*Object/, e.message)
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.send_mail(1.0 / 0) }
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.send_mail(-2**63 - 1) }
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.send_mail { 1 } }
    assert_empty QueueDispatcher.tasks
  end

  def test_symbols_become_strings_and_kwargs_stay_keywords
    t = LongRunningMailJob.enqueue.echo(:a, [:b, { c: :d }], key: :value)
    assert_equal({ 'args' => ['a', ['b', { 'c' => 'd' }]], 'kwargs' => { 'key' => 'value' } }, t.args)
  end

  def test_only_registered_task_methods_can_be_enqueued
    %i[class_eval instance_eval const_get send system new define_method instance_variable_set].each do |m|
      assert_raises(QueueDispatcher::InvalidInputError, m) { LongRunningMailJob.enqueue.public_send(m, 'x') }
    end
    assert_raises(QueueDispatcher::InvalidInputError) { LongRunningMailJob.enqueue.no_such_method }
    assert_raises(QueueDispatcher::InvalidInputError) { ListingJob.enqueue.unlisted_from_module }
    assert_equal 'ListingJob.from_module', ListingJob.enqueue.from_module.target
    assert_raises(NoMethodError) { PlainClass.enqueue }
    assert_empty QueueDispatcher.tasks(states: ['new']).reject { |t| t.target == 'ListingJob.from_module' }
  end

  def test_instance_receivers_are_stored_as_class_and_id
    t = Report.new(42).enqueue(queue: 'reports').build('pdf', pages: 3)
    assert_equal 'Report#build', t.target
    assert_equal '42', t.attributes[:receiver]
    assert_raises(QueueDispatcher::InvalidInputError) { Report.new(nil).enqueue.build('pdf') }
  end

  def test_dependent_tasks_idiom_and_batch
    another_task = LongRunningMailJob.enqueue.send_mail
    task = LongRunningMailJob.enqueue(queue: 'q').send_mail
    task.dependent_tasks = another_task
    third = LongRunningMailJob.enqueue.send_mail
    third.dependent_tasks = [another_task, task]
    assert_equal [another_task], task.reload.dependent_tasks
    assert_equal [another_task.id, task.id], third.reload.attributes[:depends_on]
    ids = QueueDispatcher.batch do
      a = LongRunningMailJob.enqueue.send_mail
      b = LongRunningMailJob.enqueue.send_mail
      b.dependent_tasks = a
      [a.id, b.id]
    end
    assert_equal [ids[0]], QueueDispatcher::Task.find(ids[1]).attributes[:depends_on]
    assert_raises(RuntimeError) do
      QueueDispatcher.batch do
        @rolled = LongRunningMailJob.enqueue.send_mail.id
        raise 'roll back'
      end
    end
    assert_raises(QueueDispatcher::NotFoundError) { QueueDispatcher::Task.find(@rolled) }
    [1].each { QueueDispatcher.batch { @kept = LongRunningMailJob.enqueue.send_mail.id; break } }
    assert QueueDispatcher::Task.find(@kept).new?, 'break out of a batch keeps its tasks'
    assert_equal 0, store.batch_depth
  end

  def test_cancel_and_predicates
    t = LongRunningMailJob.enqueue.send_mail
    assert_equal 'aborted', t.cancel
    assert t.reload.aborted? && t.executed? && !t.new? && !t.successful? && !t.error? && !t.running?
    assert_equal 'Cancelled', t.error[:class]
    assert_match(/Cancelled/, t.error_msg)
  end

  def test_store_follows_fork
    skip 'fork unsupported' unless Process.respond_to?(:fork)

    LongRunningMailJob.enqueue.send_mail
    rd, wr = IO.pipe
    pid = fork do
      rd.close
      wr.puts LongRunningMailJob.enqueue.send_mail.id
      exit!(0)
    end
    wr.close
    id = Integer(rd.read)
    Process.wait(pid)
    assert $CHILD_STATUS.success?
    assert QueueDispatcher::Task.find(id).new?
  end
end
