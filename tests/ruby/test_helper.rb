# frozen_string_literal: true

# Shared setup of the Ruby suites (bindings-ruby/test and tests/ruby): the installed gem, a fresh
# temporary database and log per test, a per-test timeout, and helpers to run the
# `queue_worker_dispatcher` daemon in a separate process.
require 'minitest/autorun'
require 'tmpdir'
require 'timeout'
require 'fileutils'
require 'rbconfig'
require 'English'
require_relative 'jobs'

Warning[:deprecated] = true
Thread.report_on_exception = false

module PerTestTimeout
  def run(*)
    Timeout.timeout(Integer(ENV.fetch('QD_TEST_TIMEOUT', '120'))) { super }
  end
end
Minitest::Test.prepend(PerTestTimeout)

module QDTestHelpers
  JOBS = File.expand_path('jobs.rb', __dir__)
  # Times for rows written with the sqlite3 CLI (Debian's 3.40 predates unixepoch('subsec'), which
  # the schema's column defaults use).
  NOW_SQL = "CAST(strftime('%s', 'now') AS INTEGER) * 1000000"

  ROOT = File.expand_path('../..', __dir__)

  def setup
    super
    @dir = Dir.mktmpdir('qd-rb-')
    @db = File.join(@dir, 'qd.db')
    @log = File.join(@dir, 'test.log')
    ENV['QD_TEST_LOG'] = @log
    ENV['QUEUE_DISPATCHER_DB'] = @db
    QueueDispatcher.database = @db
    @daemons = []
    store # open the database before GC.stress slows everything down
    GC.stress = true if gc_stress?
  end

  # QD_GC_STRESS=1: the binding's unit tests run with a GC before every allocation, which finds
  # Ruby objects the native code forgot to keep alive.
  def gc_stress? = !ENV.fetch('QD_GC_STRESS', '').empty?

  # Timing bounds are stretched under GC.stress.
  def slack(seconds) = gc_stress? ? seconds * 20 : seconds

  def teardown
    GC.stress = false
    @daemons.each { |pid| stop_daemon(pid, signal: 'KILL') }
    QueueDispatcher.database = nil
    FileUtils.rm_rf(@dir)
    super
  end

  def store = QueueDispatcher.store

  def log_lines = TestLog.lines(@log)

  # The installed executable (make test-ruby installs the gem and puts its bin dir on PATH).
  def exe
    ENV['QD_EXE'] || 'queue_worker_dispatcher'
  end

  # Starts `queue_worker_dispatcher` in a separate process on this test's database.
  def start_daemon(*args, wait: true, out: File.join(@dir, 'daemon.out'))
    pid = Process.spawn({ 'QD_TEST_LOG' => @log, 'QUEUE_DISPATCHER_DB' => @db },
                        exe, '-r', JOBS, *args, out: [out, 'a'], err: [:child, :out], pgroup: true)
    @daemons << pid
    wait_until(20, "dispatcher #{pid} heartbeating") { store.dispatchers.any? { |d| d[:pid] == pid && d[:alive] } } if wait
    pid
  end

  # TERM (graceful) and wait; returns the exit status.
  def stop_daemon(pid, signal: 'TERM', timeout: 30)
    Process.kill(signal, pid)
    Timeout.timeout(timeout) { Process.wait(pid) }
    @daemons.delete(pid)
    $CHILD_STATUS
  rescue Errno::ESRCH, Errno::ECHILD
    @daemons.delete(pid)
    nil
  end

  def wait_until(timeout, what = 'condition')
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      result = yield
      return result if result
      flunk "timed out after #{timeout}s waiting for #{what}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.02
    end
  end

  def sqlite(sql)
    out = IO.popen(['sqlite3', '-cmd', '.timeout 5000', @db, sql], err: %i[child out], &:read)
    assert $CHILD_STATUS.success?, "sqlite3 failed: #{out}"
    out
  end
end
