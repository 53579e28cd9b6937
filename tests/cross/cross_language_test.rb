# frozen_string_literal: true

# One database, two languages, driven from Ruby: Ruby enqueues Python tasks by name
# (QueueDispatcher.python_task), a Ruby and a Python dispatcher serve the same file, and each runs
# only its own language's tasks; serial queues stay serial across languages and dependencies cross
# them. The Python twin of this suite is test_cross_language.py.
require 'minitest/autorun'
require 'tmpdir'
require 'timeout'
require 'fileutils'
require 'json'
require_relative 'xjobs'

Warning[:deprecated] = true

class CrossLanguageTest < Minitest::Test
  HERE = __dir__
  PYTHON = ENV.fetch('QD_PYTHON', 'python3')
  RUBY_EXE = ENV.fetch('QD_RUBY_EXE', 'queue_worker_dispatcher')

  def run(*)
    Timeout.timeout(120) { super }
  end

  def setup
    @dir = Dir.mktmpdir('qd-cross-')
    @db = File.join(@dir, 'queue.db')
    @xlog = File.join(@dir, 'xlog')
    Dir.mkdir(@xlog)
    QueueDispatcher.database = @db
    @pids = []
  end

  def teardown
    @pids.each do |pid|
      Process.kill('KILL', -pid)
      Process.wait(pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
    QueueDispatcher.database = nil
    FileUtils.rm_rf(@dir)
  end

  def py = QueueDispatcher.python_task('xjobs:stamp')

  def start(runtime, workers: 2)
    env = { 'QD_XLOG_DIR' => @xlog, 'QUEUE_DISPATCHER_DB' => @db, 'PYTHONPATH' => [HERE, ENV.fetch('PYTHONPATH', nil)].compact.join(':'),
            'PYTHONWARNINGS' => 'error' }
    cmd = if runtime == :python
            [PYTHON, '-m', 'queue_dispatcher', 'worker', '--workers', workers.to_s, '--import', 'xjobs', '--retry-base', '0.05']
          else
            [RUBY_EXE, '-w', workers.to_s, '-r', File.join(HERE, 'xjobs.rb')]
          end
    out = File.join(@dir, "#{runtime}-#{@pids.size}.out")
    pid = Process.spawn(env, *cmd, chdir: @dir, out: [out, 'a'], err: %i[child out], pgroup: true)
    @pids << pid
    wait_until(30, "#{runtime} dispatcher #{pid}") do
      raise "#{runtime} dispatcher exited: #{File.read(out)}" if Process.wait(pid, Process::WNOHANG)

      QueueDispatcher.store.dispatchers.any? { |d| d[:pid] == pid && d[:alive] }
    end
    pid
  end

  def wait_until(timeout, what)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    until (r = yield)
      flunk "timed out waiting for #{what}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      sleep 0.02
    end
    r
  end

  def runs_of(id)
    Dir[File.join(@xlog, '*.log')].sum { |f| File.readlines(f).count { |l| l.start_with?("S #{id} ") } }
  end

  def test_python_task_handle_and_options
    dep = XJob.enqueue.stamp('first')
    t = QueueDispatcher.python_task('xjobs:stamp', queue: 'mixed', priority: 7, retries: 2, delay: 30, depends_on: dep,
                                                   meta: { user: 1 }).enqueue('x', ms: 5)
    assert_instance_of QueueDispatcher::Task, t
    a = t.reload.attributes
    assert_equal ['python', 'xjobs:stamp', 'mixed', 7, 2], a.values_at(:runtime, :target, :queue, :priority, :retries)
    assert_equal [dep.id], a[:depends_on]
    assert_equal({ 'args' => ['x'], 'kwargs' => { 'ms' => 5 } }, t.args)
    assert_equal({ 'user' => 1 }, t.meta)
    assert_operator t.run_at - t.enqueued_at, :>, 25
  end

  def test_python_task_refuses_what_the_name_shows
    ['os.system', 'myapp.jobs:_private', 'myapp.jobs:Mailer.__init__', 'XJob.stamp', ''].each do |name|
      assert_raises(QueueDispatcher::InvalidInputError, name) { QueueDispatcher.python_task(name).enqueue }
    end
    assert_raises(QueueDispatcher::InvalidInputError) { QueueDispatcher.python_task('xjobs:stamp', colour: 'red') }
    assert_raises(QueueDispatcher::InvalidInputError) { py.enqueue(Object.new) }
  end

  def test_each_dispatcher_runs_only_its_own_runtime
    py_pid = start(:python, workers: 3)
    rb_pid = start(:ruby, workers: 3)
    ids = QueueDispatcher.store.dispatchers.to_h { |d| [d[:pid], d[:id]] }
    tasks = 20.times.flat_map { |i| [[:python, py.enqueue("p#{i}", ms: 5)], [:ruby, XJob.enqueue.stamp("r#{i}", ms: 5)]] }
    tasks.each do |runtime, t|
      t.wait(60)
      assert t.successful?, t.error_msg
      assert_equal runtime.to_s, t.result['runtime']
      assert_equal(runtime == :python ? py_pid : rb_pid, t.result['pid'])
      assert_equal ids[runtime == :python ? py_pid : rb_pid], t.attributes[:dispatcher_id]
    end
  end

  def test_serial_queue_stays_serial_across_runtimes
    start(:python, workers: 4)
    start(:ruby, workers: 4)
    tasks = []
    QueueDispatcher.batch do
      16.times do |i|
        tasks << (i.even? ? QueueDispatcher.python_task('xjobs:stamp', queue: 'mixed').enqueue(i, ms: 15) : XJob.enqueue(queue: 'mixed').stamp(i, ms: 15))
        py.enqueue("p#{i}", ms: 15)
        XJob.enqueue.stamp("r#{i}", ms: 15)
      end
    end
    results = tasks.map { |t| t.wait(60).result }
    assert_equal (0...16).to_a, results.map { |r| r['label'] }
    assert_equal %w[python ruby], results.map { |r| r['runtime'] }.uniq.sort
    results.each_cons(2) { |a, b| assert_operator a['end'], :<=, b['start'], "#{a} overlaps #{b}" }
  end

  def test_python_task_after_failed_ruby_task_fails_without_running
    start(:python)
    start(:ruby)
    bad = XJob.enqueue(retries: 1).fail_now('doomed')
    after = QueueDispatcher.python_task('xjobs:stamp', depends_on: [bad]).enqueue('never')
    after2 = XJob.enqueue(depends_on: after).stamp('never either')
    assert bad.wait(60).error?
    assert_match(/designed to fail/, bad.error_msg)
    assert_equal 2, bad.attempts
    [after, after2].each do |t|
      assert t.wait(60).error?, t.state
      assert_equal 'DependencyFailed', t.error[:class]
      assert_nil t.started_at
      assert_equal 0, runs_of(t.id)
    end
    assert_includes after.error[:message], bad.id.to_s
  end

  def test_python_task_after_successful_ruby_task_runs_after_it
    start(:python)
    start(:ruby)
    first = XJob.enqueue.stamp('first', ms: 200)
    second = QueueDispatcher.python_task('xjobs:stamp', depends_on: first, queue: 'q').enqueue('second', ms: 1)
    third = XJob.enqueue(depends_on: second).stamp('third', ms: 1)
    r1, r2, r3 = [first, second, third].map { |t| t.wait(60).result }
    assert_equal %w[ruby python ruby], [r1, r2, r3].map { |r| r['runtime'] }
    assert_operator r1['end'], :<=, r2['start']
    assert_operator r2['end'], :<=, r3['start']
  end

  def test_ruby_status_lists_both_runtimes
    py_pid = start(:python)
    rb_pid = start(:ruby)
    slow = [py.enqueue('slow', ms: 3000), XJob.enqueue.stamp('slow', ms: 3000)]
    wait_until(30, 'both slow tasks running') { slow.all? { |t| t.reload.running? } }
    out = IO.popen([RUBY_EXE, 'status', '--db', @db], &:read)
    lines = out.lines
    assert(lines.any? { |l| l.include?(py_pid.to_s) && l.include?('python') }, out)
    assert(lines.any? { |l| l.include?(rb_pid.to_s) && l.include?('ruby') }, out)
    assert(lines.any? { |l| l.include?('xjobs:stamp') }, out)
    assert(lines.any? { |l| l.include?('XJob.stamp') }, out)
  end
end
