# frozen_string_literal: true

# The native layer (bindings-ruby/src): value conversion, error mapping, GVL release with
# unblocking functions, batches. Also run once under GC.stress (QD_GC_STRESS=1).
require_relative '../../tests/ruby/test_helper'

class NativeTest < Minitest::Test
  include QDTestHelpers
  N = QueueDispatcher::Native

  def test_version_is_the_cargo_version
    cargo = File.read(File.join(ROOT, 'Cargo.toml'))[/\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"/m, 1]
    assert_equal cargo, QueueDispatcher::VERSION
    assert_equal N::VERSION, QueueDispatcher::VERSION
    assert_equal cargo, Gem.loaded_specs['queue_dispatcher']&.version&.to_s if Gem.loaded_specs['queue_dispatcher']
  end

  def test_error_classes_cover_every_engine_variant
    names = %w[InvalidInputError NotFoundError MissingDependencyError DependencyCycleError InvalidStateError
               StaleTokenError NotADatabaseError SchemaTooNewError BusyError StoppedError StorageError]
    names.each do |n|
      klass = QueueDispatcher.const_get(n)
      assert_operator klass, :<, QueueDispatcher::Error
    end
    assert_operator QueueDispatcher::Error, :<, StandardError
    # The exhaustive match lives in errors.rs; every variant has one of these classes.
    src = File.read(File.join(ROOT, 'bindings-ruby/src/errors.rs'))
    refute_match(/_ =>/, src)
    names.each { |n| assert_includes src, "\"#{n}\"" }
  end

  def test_errors_raised_are_mapped
    e = assert_raises(QueueDispatcher::NotFoundError) { store.task(424_242) }
    assert_equal 424_242, e.task_id
    e = assert_raises(QueueDispatcher::MissingDependencyError) { store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, { depends_on: [999] }) }
    assert_match(/999/, e.message)
    a = store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, nil)
    b = store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, { depends_on: [a] })
    assert_raises(QueueDispatcher::DependencyCycleError) { store.add_dependencies(a, [b]) }
    File.write(File.join(@dir, 'junk.db'), 'this is not sqlite' * 100)
    assert_raises(QueueDispatcher::NotADatabaseError) { N::Store.open(File.join(@dir, 'junk.db')) }
    e = assert_raises(QueueDispatcher::InvalidInputError) { store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, { queue: '' }) }
    assert_equal 'queue', e.field
  end

  def test_json_conversion_and_refusals
    assert_equal '[1,"x","sym",null,true,false,1.5,{"k":"v","s":[]}]',
                 N.dump_json([1, 'x', :sym, nil, true, false, 1.5, { k: 'v', 's' => [] }], 'v')
    assert_equal '"caf\u00e9 \"q\" \\\\ \n"'.then { |s| JSON.parse("[#{s}]")[0] }, JSON.parse(N.dump_json("caf\u00e9 \"q\" \\ \n", 'v'))
    cases = {
      [Time.now] => /args\[0\].*Time/,
      [1, { at: Object.new }] => /args\[1\]\[:at\].*Object/,
      [Float::NAN] => /args\[0\].*NaN/,
      [2**64] => /args\[0\].*64-bit/,
      [{ 1 => 2 }] => /args\[0\].*key.*String or Symbol/,
      ["\xff".b] => /args\[0\].*UTF-8/
    }
    cases.each do |args, msg|
      e = assert_raises(QueueDispatcher::InvalidInputError) { store.enqueue('LongRunningMailJob.send_mail', nil, args, nil, nil) }
      assert_match msg, e.message
    end
    e = assert_raises(QueueDispatcher::InvalidInputError) { store.enqueue('LongRunningMailJob.send_mail', nil, [], { to: Float::INFINITY }, nil) }
    assert_match(/kwargs\[:to\]/, e.message)
    deep = [] ; cur = deep
    70.times { cur << (n = []); cur = n }
    assert_raises(QueueDispatcher::InvalidInputError) { N.dump_json(deep, 'deep') }
    assert_empty store.list(nil), 'nothing stored by refused enqueues'
  end

  def test_claim_releases_the_gvl_and_thread_kill_returns_promptly
    d = N::Dispatcher.start(store, { workers: 2 })
    w = d.worker
    ticks = 0
    counter = Thread.new { loop { ticks += 1; sleep 0.001 } }
    t = Thread.new { w.claim(nil) }
    sleep 0.3
    assert_operator ticks, :>, gc_stress? ? 2 : 20, 'other Ruby threads run while a worker waits in claim'
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    t.kill
    assert t.join(slack(2)), 'Thread#kill of a waiting worker returns'
    assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - started, :<, slack(0.5)
    # Thread#raise too.
    t = Thread.new { w.claim(nil) }
    sleep 0.1
    t.raise(RuntimeError, 'stop waiting')
    assert_raises(RuntimeError) { t.value }
    counter.kill
    d.shutdown(0)
  end

  def test_task_wait_is_interruptible_and_wakes_on_completion
    id = store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, nil)
    t = Thread.new { store.wait(id, nil) }
    sleep 0.2
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    t.kill
    assert t.join(slack(2))
    assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - started, :<, slack(0.5)
    assert_equal 'new', store.wait(id, 0.05)[:state], 'a timed-out wait returns the task as it is'
    d = N::Dispatcher.start(store, { workers: 1 })
    w = d.worker
    waiter = Thread.new { store.wait(id, 10) }
    c = w.claim(5)
    assert_equal id, c.id
    assert_equal :successful, w.complete(c, '"ok"', nil)
    assert_equal 'successful', waiter.value[:state]
    d.shutdown(0)
  end

  def test_stop_claiming_wakes_waiting_workers_with_stopped
    d = N::Dispatcher.start(store, { workers: 1 })
    w = d.worker
    t = Thread.new { w.claim(nil) }
    sleep 0.1
    d.stop_claiming
    assert_raises(QueueDispatcher::StoppedError) { t.value }
    d.shutdown(0)
  end

  def test_outcomes_and_complete_and_claim
    d = N::Dispatcher.start(store, { workers: 1, retry_base: 0.01, retry_cap: 0.02 })
    w = d.worker
    a = store.enqueue('LongRunningMailJob.send_mail', nil, ['a'], nil, nil)
    b = store.enqueue('LongRunningMailJob.send_mail', nil, ['b'], nil, { retries: 1 })
    c = w.claim(5)
    assert_equal [a, :run, 'LongRunningMailJob.send_mail'], [c.id, c.kind, c.target]
    assert_nil c.cancelled
    settled, nxt = w.complete_and_claim(c, '{"x":1}', nil, 5)
    assert_equal :successful, settled
    assert_equal b, nxt.id
    assert_equal :retrying, w.complete(nxt, nil, ['ArgumentError', 'bad', ['x.rb:1']])
    again = w.claim(5)
    assert_equal b, again.id
    assert_equal :error, w.complete(again, nil, ['ArgumentError', 'bad again', []])
    t = store.task(b)
    assert_equal 'error', t[:state]
    assert_equal({ class: 'ArgumentError', message: 'bad again', backtrace: [] }, t[:error])
    assert_equal 2, t[:error_history].size, 'every failed attempt is in the history'
    assert_equal '{"x":1}', store.task(a)[:result]
    d.shutdown(0)
  end

  def test_batch_commits_together_or_rolls_back
    store.batch_begin
    a = store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, nil)
    other = Thread.new { N::Store.open(@db).list(nil).size }.value
    assert_equal 0, other, 'a batch is invisible to others until it ends'
    store.batch_end(true)
    assert_equal 'new', store.task(a)[:state]
    store.batch_begin
    b = store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, nil)
    store.batch_end(false)
    assert_raises(QueueDispatcher::NotFoundError) { store.task(b) }
    assert_raises(QueueDispatcher::InvalidInputError) { store.batch_end(true) }
  end

  def test_enqueue_from_another_thread_waits_for_a_batch_without_deadlock
    store.batch_begin
    t = Thread.new { store.enqueue('LongRunningMailJob.send_mail', nil, [], nil, nil) }
    sleep 0.1
    assert t.alive?, 'waits for the batch (with the GVL released)'
    store.batch_end(true)
    assert_kind_of Integer, t.value
  end

  def test_pidfile_refuses_a_second_holder
    path = File.join(@dir, 'x.pid')
    held = N::PidFile.acquire(path)
    e = assert_raises(QueueDispatcher::InvalidInputError) { N::PidFile.acquire(path) }
    assert_match(/refusing to start twice/, e.message)
    held.release
    N::PidFile.acquire(path).release
  end

  def test_target_validation_and_ages
    N.validate_target('LongRunningMailJob.send_mail')
    %w[Kernel#system LongRunningMailJob.class_eval Object.const_get Foo.send Foo].each do |bad|
      assert_raises(QueueDispatcher::InvalidInputError) { N.validate_target(bad) }
    end
    assert_equal 7 * 86_400.0, N.parse_age('7d')
    assert_raises(QueueDispatcher::InvalidInputError) { N.parse_age('soon') }
  end
end
