# frozen_string_literal: true

# The PostgreSQL store from Ruby: a postgres:// URL set with QueueDispatcher.database and given to
# the daemon with --db goes through the engine's own URL handling, end to end. Skipped unless
# QUEUE_DISPATCHER_TEST_PG is set; each test has its own schema, dropped afterwards.
require_relative 'test_helper'

class PostgresTest < Minitest::Test
  include QDTestHelpers

  PG = ENV.fetch('QUEUE_DISPATCHER_TEST_PG', '')

  def setup
    skip 'PostgreSQL store skipped: QUEUE_DISPATCHER_TEST_PG is not set' if PG.empty?
    super
    @schema = "qd_rb_#{Process.pid}_#{rand(1 << 32).to_s(16)}"
    @db = "#{PG}#{PG.include?('?') ? '&' : '?'}schema=#{@schema}"
    ENV['QUEUE_DISPATCHER_DB'] = @db
    QueueDispatcher.database = @db
  end

  def teardown
    super unless PG.empty?
  ensure
    if @schema
      system('psql', PG, '-qc', %(DROP SCHEMA IF EXISTS "#{@schema}" CASCADE), out: File::NULL, err: File::NULL)
    end
  end

  def test_a_postgres_url_runs_tasks_in_process_and_in_the_daemon
    first = StepJob.enqueue(queue: 'pg').step(0.05)
    mail = LongRunningMailJob.enqueue(queue: 'pg').send_mail('pg@example.com', subject: 'hi')
    # --db, not the environment (which names a SQLite file here), tells the daemon where to look.
    pid = Process.spawn({ 'QD_TEST_LOG' => @log, 'QUEUE_DISPATCHER_DB' => File.join(@dir, 'not-this.db') },
                        exe, '-r', JOBS, '-w', '2', '--db', @db,
                        out: [File.join(@dir, 'daemon.out'), 'a'], err: %i[child out], pgroup: true)
    @daemons << pid
    wait_until(20, "dispatcher #{pid} heartbeating") { store.dispatchers.any? { |d| d[:pid] == pid && d[:alive] } }
    mail.wait(20)
    assert mail.successful?, "task #{mail.id} ended #{mail.state}: #{mail.error_msg}"
    assert_equal 'mail to pg@example.com', mail.result
    assert_operator mail.started_at, :>=, first.reload.finished_at, 'the serial queue kept its order'
    status = IO.popen([exe, 'status', '--db', @db], err: %i[child out], &:read)
    assert_includes status, pid.to_s, 'status over the same URL lists the daemon'
    assert_equal 0, stop_daemon(pid).exitstatus
  end

  def test_a_bad_postgres_url_is_refused_with_a_clear_error
    QueueDispatcher.database = 'postgres://u@h:notaport/db'
    err = assert_raises(QueueDispatcher::Error) { QueueDispatcher.store }
    assert_match(/not a valid PostgreSQL URL/, err.message)
  end
end
