# frozen_string_literal: true

# Ruby benchmarks (`make bench`): one JSON line per figure, `{"bench": NAME, "value": N, "unit": U,
# ...}`, never asserted. BENCH_SHORT=1 is the quick CI pass. Uses the installed gem.
#
# - rb_enqueue: `BenchJob.enqueue.noop(payload)`, one task per call, committed before it returns;
#   measured in interleaved rounds with two same-run baselines on the same kind of file: raw
#   SQLite (BEGIN IMMEDIATE; INSERT of a ~100-byte row; COMMIT) and the engine's own
#   `Store::enqueue` loop (`core_enqueue`), both run from Rust inside this process.
# - rb_drain_2w: `queue_worker_dispatcher -w 2` (a separate process) drains N no-op tasks that
#   become visible together (one batch); tasks/s from the batch commit to the last finish. Beside
#   it, the engine's own ceiling in the same run: two Rust threads looping complete_and_claim.
# - rb_latency_p50_ms / rb_latency_p99_ms: an idle `queue_worker_dispatcher -w 2`; one task at
#   a time, enqueued by this process; latency is the task's started_at - enqueued_at (the
#   engine's clock: enqueue commit to claim, across processes).
require 'json'
require 'tmpdir'
require 'rbconfig'
require 'queue_dispatcher'
require_relative 'bench_jobs'

SHORT = !ENV.fetch('BENCH_SHORT', '').empty? && ENV['BENCH_SHORT'] != '0'
ROUNDS = SHORT ? 1 : 5
INSERTS = SHORT ? 5_000 : 20_000
DRAIN = SHORT ? 5_000 : 20_000
SAMPLES = SHORT ? 300 : 2_000
PAYLOAD = 'x' * 76
ARGS_JSON = JSON.generate('args' => [PAYLOAD], 'kwargs' => {})
JOBS = File.expand_path('bench_jobs.rb', __dir__)
EXE = ENV['QD_EXE'] || 'queue_worker_dispatcher'

def report(name, value, unit, extra = {})
  puts JSON.generate({ 'bench' => name, 'value' => value, 'unit' => unit }.merge(extra))
  $stdout.flush
end

def median(values)
  v = values.sort
  v.size.odd? ? v[v.size / 2] : (v[v.size / 2 - 1] + v[v.size / 2]) / 2.0
end

def fresh_db
  dir = Dir.mktmpdir('qd-rb-bench-')
  [dir, File.join(dir, 'bench.db')]
end

def rb_enqueue(n)
  dir, db = fresh_db
  QueueDispatcher.database = db
  (n / 10).clamp(50, nil).times { BenchJob.enqueue.noop(PAYLOAD) }
  started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  n.times { BenchJob.enqueue.noop(PAYLOAD) }
  n / (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
ensure
  QueueDispatcher.database = nil
  FileUtils.rm_rf(dir)
end

def native_figure(kind, n)
  dir, db = fresh_db
  case kind
  when :sqlite then QueueDispatcher::Native.bench_sqlite_insert(db, n, ARGS_JSON)
  when :core then QueueDispatcher::Native.bench_core_enqueue(db, n, 'BenchJob.noop', ARGS_JSON)
  end
ensure
  FileUtils.rm_rf(dir)
end

def enqueue_figures
  sqlite = []
  core = []
  ruby = []
  ROUNDS.times do
    sqlite << native_figure(:sqlite, INSERTS)
    core << native_figure(:core, INSERTS)
    ruby << rb_enqueue(INSERTS)
  end
  s = median(sqlite)
  c = median(core)
  r = median(ruby)
  report('rb_baseline_sqlite_insert_tx', s.round, 'tx/s', 'rounds' => ROUNDS, 'n' => INSERTS)
  report('rb_baseline_core_enqueue', c.round, 'tasks/s', 'rounds' => ROUNDS, 'n' => INSERTS)
  report('rb_enqueue', r.round, 'tasks/s', 'core_enqueue' => c.round, 'ratio_to_core' => (r / c).round(3),
                                           'sqlite_insert_tx' => s.round, 'ratio_to_sqlite' => (r / s).round(3),
                                           'rounds' => ROUNDS, 'n' => INSERTS)
end

# Starts the dispatcher as a separate process and waits for its heartbeat.
def with_daemon(db, workers)
  pid = Process.spawn({ 'QUEUE_DISPATCHER_DB' => db }, EXE, '-w', workers.to_s, '-r', JOBS, out: File::NULL, err: File::NULL)
  deadline = Time.now + 30
  sleep 0.02 until QueueDispatcher.store.dispatchers.any? { |d| d[:pid] == pid && d[:alive] } || Time.now > deadline
  raise "#{EXE} did not start within 30 s" if Time.now > deadline
  yield
ensure
  if pid
    Process.kill('TERM', pid)
    Process.wait(pid)
  end
end

def core_drain(n)
  dir, db = fresh_db
  store = QueueDispatcher::Native::Store.open(db)
  store.batch_begin
  n.times { store.enqueue('BenchJob.noop', nil, [], nil, nil) }
  store.batch_end(true)
  QueueDispatcher::Native.bench_core_drain(db, 2)
ensure
  FileUtils.rm_rf(dir)
end

def drain_figure
  rates = []
  core = []
  ROUNDS.times do
    core << core_drain(DRAIN)
    dir, db = fresh_db
    QueueDispatcher.database = db
    with_daemon(db, 2) do
      QueueDispatcher.batch { DRAIN.times { BenchJob.enqueue.noop } }
      committed = Time.now
      deadline = Time.now + 300
      loop do
        c = QueueDispatcher.counts.first
        break if c && c[:successful] == DRAIN
        raise "rb_drain_2w: the dispatcher did not drain #{DRAIN} tasks within 300 s (#{c.inspect})" if Time.now > deadline

        # The end is read from the tasks' finished_at; polling rarely leaves the CPU to the dispatcher.
        sleep 0.25
      end
      finished = QueueDispatcher.tasks(limit: DRAIN, states: ['successful']).map { |t| t.attributes[:finished_at] }.max
      rates << DRAIN / (finished / 1e6 - committed.to_f)
    end
  ensure
    QueueDispatcher.database = nil
    FileUtils.rm_rf(dir)
  end
  c = median(core)
  r = median(rates)
  report('rb_baseline_core_drain_2w', c.round, 'tasks/s', 'tasks' => DRAIN, 'threads' => 2, 'rounds' => ROUNDS)
  report('rb_drain_2w', r.round, 'tasks/s', 'tasks' => DRAIN, 'workers' => 2, 'core_drain_2w' => c.round,
                                            'ratio_to_core' => (r / c).round(3), 'rounds' => ROUNDS)
end

def latency_figures
  dir, db = fresh_db
  QueueDispatcher.database = db
  samples = []
  with_daemon(db, 2) do
    warm = SAMPLES / 20 + 10
    (warm + SAMPLES).times do |i|
      sleep 0.002
      t = BenchJob.enqueue.noop.wait(10)
      raise "rb_latency: task #{t.id} not run within 10 s (#{t.state})" unless t.successful?

      a = t.attributes
      samples << (a[:started_at] - a[:enqueued_at]) / 1000.0 if i >= warm
    end
  end
  samples.sort!
  { 'p50' => 50, 'p99' => 99 }.each do |name, p|
    idx = [(samples.size * p / 100.0).ceil - 1, 0].max
    report("rb_latency_#{name}_ms", samples[idx].round(3), 'ms', 'samples' => samples.size, 'workers' => 2)
  end
ensure
  QueueDispatcher.database = nil
  FileUtils.rm_rf(dir)
end

# BENCH_ONLY=enqueue,drain,latency runs a subset.
only = ENV.fetch('BENCH_ONLY', '').split(',')
enqueue_figures if only.empty? || only.include?('enqueue')
drain_figure if only.empty? || only.include?('drain')
latency_figures if only.empty? || only.include?('latency')
