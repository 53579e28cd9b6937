# frozen_string_literal: true

# End to end: the `queue_worker_dispatcher` executable of the installed gem, as a separate
# process on a fresh database per test.
require_relative 'test_helper'

class DaemonTest < Minitest::Test
  include QDTestHelpers

  def done(task, timeout = 20)
    task.wait(timeout)
    assert task.executed?, "task #{task.id} finished (#{task.state})"
    task
  end

  def test_readme_examples_verbatim_with_the_daemon_stopped
    to = 'someone@example.com'
    another_task = LongRunningMailJob.enqueue.send_mail('first')
    # --- README ---
    task = LongRunningMailJob.enqueue.send_mail                  # parallel
    task = LongRunningMailJob.enqueue(queue: 'queue_name').send_mail(to, subject: 'hi')
    task.dependent_tasks = another_task                         # also an Array
    # --- end ---
    start_daemon('-w', '4')
    done(task)
    done(another_task)
    assert task.successful?
    assert_equal "mail to #{to}", task.result
    assert_operator task.started_at, :>=, another_task.finished_at, 'ran after its dependency'
    assert_includes log_lines, "send_mail #{task.id} \"someone@example.com\" \"hi\""
    assert_equal 3, QueueDispatcher.tasks(states: ['successful']).size
  end

  def test_readme_idiom_inside_a_batch_while_the_daemon_runs
    start_daemon('-w', '4')
    tasks = 5.times.map do
      QueueDispatcher.batch do
        another_task = StepJob.enqueue.step(0.05)
        task = LongRunningMailJob.enqueue(queue: 'queue_name').send_mail('x', subject: 'hi')
        task.dependent_tasks = another_task
        [another_task, task]
      end
    end
    tasks.each do |another_task, task|
      done(task)
      done(another_task)
      assert task.successful?
      assert_operator task.started_at, :>=, another_task.finished_at
    end
  end

  def test_serial_queue_runs_one_at_a_time_in_order
    tasks = 6.times.map { StepJob.enqueue(queue: 'serial').step(0.05) }
    parallel = 4.times.map { StepJob.enqueue.step(0.2) }
    start_daemon('-w', '6')
    (tasks + parallel).each { |t| done(t) }
    serial_ids = tasks.map(&:id)
    lines = log_lines.select { |l| serial_ids.include?(l.split.last.to_i) }
    expected = serial_ids.flat_map { |id| ["start #{id}", "end #{id}"] }
    assert_equal expected, lines, 'serial queue: each task ends before the next starts, in id order'
    starts = parallel.map(&:started_at).sort
    assert_operator starts.last - starts.first, :<, 0.2, 'unqueued tasks ran in parallel'
  end

  def test_cross_queue_failed_dependency
    failing = FailJob.enqueue(queue: 'a').boom
    dependent = CallbackJob.enqueue(queue: 'b', depends_on: failing).ok
    transitive = LongRunningMailJob.enqueue(queue: 'c', depends_on: dependent).send_mail
    start_daemon('-w', '2')
    [failing, dependent, transitive].each { |t| done(t) }
    assert failing.error?
    assert dependent.error?
    assert_equal 'DependencyFailed', dependent.error[:class]
    assert_match(/#{failing.id}/, dependent.error[:message])
    assert transitive.error?
    wait_until(10, 'on_error callback') { log_lines.include?("on_error #{dependent.id} DependencyFailed") }
    refute(log_lines.any? { |l| l.start_with?('send_mail') }, 'dependents never ran')
  end

  def test_retry_base_sets_the_delay_before_the_first_retry
    task = FailJob.enqueue(retries: 1).boom
    before = Time.now
    start_daemon('-w', '1', '--retry-base', '40')
    wait_until(20, 'the first attempt failed and was rescheduled') { task.reload.attempts == 1 && task.new? }
    assert_equal 1, task.error_history.size
    # Full jitter on the upper half: between 20 and 40 s later (the default base would be 0.5-1 s).
    assert_operator task.run_at - before, :>, 15, 'the retry waits for --retry-base'
    assert_operator task.run_at - before, :<, 60
  end

  def test_sigkill_mid_task_is_recovered
    marker = File.join(@dir, 'marker')
    t = StepJob.enqueue.once(marker)
    pid = start_daemon('-w', '2', '--lease', '1.5')
    wait_until(10, 'task started') { log_lines.include?("start #{t.id}") }
    stop_daemon(pid, signal: 'KILL')
    assert t.reload.running?, 'still running in the database after the crash'
    start_daemon('-w', '2', '--lease', '1.5')
    done(t, 30)
    assert t.successful?
    assert_equal 'second run', t.result
    assert_equal 1, t.attributes[:lost]
    assert_includes log_lines, "rerun #{t.id}"
  end

  def test_graceful_sigterm_lets_running_tasks_finish
    running = StepJob.enqueue(queue: 's').step(1.0)
    queued = StepJob.enqueue(queue: 's').step(0.01)
    pid = start_daemon('-w', '2')
    wait_until(10, 'task started') { log_lines.include?("start #{running.id}") }
    status = stop_daemon(pid, signal: 'TERM')
    assert status.success?, "exit status #{status.inspect}"
    assert running.reload.successful?, 'the running task finished before the daemon left'
    assert queued.reload.new?, 'nothing new was claimed after SIGTERM'
    assert_empty store.dispatchers, 'the heartbeat row is gone'
  end

  def test_second_signal_leaves_at_once_and_the_task_is_recovered
    t = StepJob.enqueue.until_cancelled(30)
    pid = start_daemon('-w', '1')
    wait_until(10, 'task started') { log_lines.include?("start #{t.id}") }
    Process.kill('INT', pid)
    sleep 0.2
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    stop_daemon(pid, signal: 'INT', timeout: 10)
    assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - started, :<, 3
    t.reload
    assert t.new?, "released back to new (#{t.state})"
    assert_equal 1, t.attributes[:lost]
  end

  def test_background_daemon_heartbeats_runs_tasks_and_refuses_a_second_start
    pidfile = File.join(@dir, 'qwd.pid')
    logfile = File.join(@dir, 'qwd.log')
    env = { 'QD_TEST_LOG' => @log, 'QUEUE_DISPATCHER_DB' => @db }
    args = [exe, '-b', '-w', '2', '-r', JOBS, '--pidfile', pidfile, '--log', logfile]
    assert system(env, *args), 'the -b start returns at once'
    pid = wait_until(10, 'pid file') { File.exist?(pidfile) && File.read(pidfile).to_i.positive? && File.read(pidfile).to_i }
    @daemon_pid = pid
    wait_until(10, 'heartbeat') { store.dispatchers.any? { |d| d[:pid] == pid && d[:alive] } }
    t = done(LongRunningMailJob.enqueue.send_mail('bg'))
    assert t.successful?
    beat = store.dispatchers.first[:heartbeat_at]
    wait_until(5, 'next heartbeat') { store.dispatchers.first[:heartbeat_at] > beat }
    out = IO.popen(env, args, err: %i[child out], &:read)
    refute $CHILD_STATUS.success?
    assert_match(/refusing to start twice/, out)
    Process.kill('TERM', pid)
    wait_until(15, 'daemon gone') { !File.exist?(pidfile) }
    assert_match(/started: 2 workers/, File.read(logfile))
  ensure
    begin
      Process.kill('KILL', @daemon_pid) if @daemon_pid
    rescue Errno::ESRCH
      nil
    end
  end

  def test_processes_supervisor_restarts_dead_workers
    sup = start_daemon('-w', '2', '--processes', '2', wait: false)
    wait_until(20, 'two worker processes') { store.dispatchers.count { |d| d[:alive] }.eql?(2) }
    victim = store.dispatchers.first[:pid]
    Process.kill('KILL', victim)
    wait_until(20, 'a replacement') { (pids = store.dispatchers.select { |d| d[:alive] }.map { |d| d[:pid] }).size == 2 && !pids.include?(victim) }
    t = done(LongRunningMailJob.enqueue.send_mail('sup'))
    assert t.successful?
    status = stop_daemon(sup, signal: 'TERM')
    assert status.success?
    wait_until(10, 'children gone') { store.dispatchers.none? { |d| d[:alive] } }
  end

  def test_processes_children_leave_when_the_supervisor_dies
    sup = start_daemon('-w', '1', '--processes', '2', wait: false)
    wait_until(20, 'two worker processes') { store.dispatchers.count { |d| d[:alive] }.eql?(2) }
    stop_daemon(sup, signal: 'KILL')
    wait_until(15, 'orphaned children stopped') { store.dispatchers.empty? }
  end

  def test_a_killed_worker_thread_is_replaced
    start_daemon('-w', '1')
    rude = done(RudeJob.enqueue.kill_my_thread)
    assert_equal 'Interrupted', rude.error[:class]
    assert done(LongRunningMailJob.enqueue.send_mail('after')).successful?, 'the single worker was replaced'
  end

  def test_forbidden_rows_end_in_error_and_nothing_runs
    pwned = File.join(@dir, 'pwned')
    store # creates the database before the sqlite3 CLI writes to it
    rows = {
      'Kernel#system' => ["touch #{pwned}"],
      'LongRunningMailJob.class_eval' => ["File.write('#{pwned}', 'x')"],
      'LongRunningMailJob.instance_eval' => ["File.write('#{pwned}', 'x')"],
      'Object.const_get' => ['PlainClass'],
      'UnknownClass.run' => [],
      'PlainClass.run' => []
    }
    q = ->(text) { "'#{text.gsub("'", "''")}'" }
    ids = rows.map do |target, args|
      payload = JSON.generate('args' => args, 'kwargs' => {})
      sqlite("INSERT INTO tasks (runtime, target, run_at, enqueued_at, args) VALUES ('ruby', #{q[target]}, #{NOW_SQL}, #{NOW_SQL}, #{q[payload]}) RETURNING id;").to_i
    end
    start_daemon('-w', '2')
    ids.zip(rows.keys).each do |id, target|
      t = done(QueueDispatcher::Task.new(id))
      assert t.error?, "#{target}: #{t.state}"
      assert_match(/not a (registered job class|task method)/, t.error[:message])
    end
    refute File.exist?(pwned), 'no forbidden row ran'
    refute_includes log_lines, 'PlainClass ran'
  end

  def test_rails_executor_wraps_each_task
    stub = File.join(@dir, 'rails_stub.rb')
    File.write(stub, <<~RUBY)
      module Rails
        Executor = Object.new
        def Executor.wrap
          Thread.current[:fake_rails_executor] = true
          yield
        ensure
          Thread.current[:fake_rails_executor] = nil
        end
        Reloader = Object.new
        def Reloader.wrap(&block) = Executor.wrap(&block) # as Rails' reloader runs the executor
        App = Struct.new(:executor, :reloader) { def eager_load! = nil }.new(Executor, Reloader)
        def self.application = App
      end
    RUBY
    start_daemon('-r', stub, '-w', '1')
    assert_equal 'inside executor', done(ExecutorJob.enqueue.inside).result
  end

  def test_ctrl_c_interrupts_a_waiting_enqueuer_promptly
    id = LongRunningMailJob.enqueue.send_mail.id
    script = "require 'queue_dispatcher'; $stdout.sync = true; t = QueueDispatcher::Task.new(#{id}); puts 'waiting'; " \
             "begin; t.wait; rescue Interrupt; puts 'interrupted'; exit 3; end"
    IO.popen({ 'QUEUE_DISPATCHER_DB' => @db }, [RbConfig.ruby, '-e', script], err: %i[child out]) do |io|
      assert_equal "waiting\n", io.gets
      sleep 0.2
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Process.kill('INT', io.pid)
      assert_equal "interrupted\n", io.gets
      assert_operator Process.clock_gettime(Process::CLOCK_MONOTONIC) - started, :<, 1
    end
    assert_equal 3, $CHILD_STATUS.exitstatus
  end

  def test_admin_commands_and_version
    out = IO.popen([exe, '--version'], &:read)
    assert_equal "queue_worker_dispatcher #{QueueDispatcher::VERSION}\n", out
    help = IO.popen([exe, '--help'], &:read)
    %w[--workers --require --db --queues --processes --background --version --help status reset].each { |w| assert_includes help, w }
    LongRunningMailJob.enqueue(queue: 'mail').send_mail
    out = IO.popen([exe, 'status', '--db', @db], &:read)
    assert_match(/mail\s+1/, out)
    assert_match(/dispatchers: none running/, out)
    assert system(exe, 'pause', 'mail', '--db', @db, out: File::NULL)
    assert_match(/paused/, IO.popen([exe, 'status', '--db', @db], &:read))
    out = IO.popen([exe, 'reset', '--db', @db], &:read)
    assert_match(/aborted 1/, out)
    refute system(exe, 'frobnicate', err: File::NULL)
  end

  def test_queues_option_serves_only_those_queues
    mail = LongRunningMailJob.enqueue(queue: 'mail').send_mail
    other = LongRunningMailJob.enqueue(queue: 'other').send_mail
    free = LongRunningMailJob.enqueue.send_mail
    pid = start_daemon('--queues', 'mail', '-w', '2')
    wait_until(5, 'status line in the process title') { File.read("/proc/#{pid}/cmdline").match?(%r{queue_worker_dispatcher: \d+/2 busy}) }
    done(mail)
    sleep 0.3
    assert other.reload.new?
    assert free.reload.new?
  end
end
