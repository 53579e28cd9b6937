# frozen_string_literal: true

require 'English'
require 'optparse'
require 'queue_dispatcher'
require 'rbconfig'
require 'logger'

module QueueDispatcher
  # `queue_worker_dispatcher`: runs a dispatcher (N Ruby worker threads in this process, or
  # --processes P such processes under a supervisor), and the admin commands status, reset,
  # pause, resume and purge. Signal handling: trap handlers only write to a self-pipe; the main
  # thread does the rest. SIGTERM/SIGINT: stop claiming, let running tasks finish up to --grace,
  # then leave; a second signal leaves at once (those tasks are recovered later). Nothing is lost.
  class CLI
    USAGE = <<~TEXT
      Usage: queue_worker_dispatcher [options]              run the dispatcher (foreground)
             queue_worker_dispatcher -b [options]           run it as a daemon (pid file, log file)
             queue_worker_dispatcher status [--db PATH]     dispatchers, queues, running tasks
             queue_worker_dispatcher reset [--db PATH]      abort every unfinished task
             queue_worker_dispatcher pause QUEUE | resume QUEUE [--db PATH]
             queue_worker_dispatcher purge AGE [--db PATH]  delete finished tasks older than AGE (7d, 12h...)
    TEXT

    def initialize(argv)
      @argv = argv.dup
      @opts = {
        workers: 10, requires: [], db: nil, queues: nil, parallel: nil, processes: 1, background: false,
        pidfile: nil, logfile: nil, grace: 30.0, lease: env_f('QUEUE_DISPATCHER_LEASE'),
        heartbeat: env_f('QUEUE_DISPATCHER_HEARTBEAT'), max_lost: env_i('QUEUE_DISPATCHER_MAX_LOST'), retry_base: nil,
        verbose: false, child: false
      }
    end

    def run
      parser.parse!(@argv)
      command = @argv.shift
      QueueDispatcher.database = @opts[:db] if @opts[:db]
      case command
      when nil then start
      when 'status' then $stdout.write(QueueDispatcher.status_report) && 0
      when 'reset' then puts("aborted #{QueueDispatcher.reset!} unfinished task(s)") || 0
      when 'pause', 'resume'
        queue = @argv.shift or return usage_error("#{command} needs a queue name")
        QueueDispatcher.public_send(command, queue)
        puts "queue #{queue} #{command == 'pause' ? 'paused' : 'resumed'}"
        0
      when 'purge'
        age = @argv.shift or return usage_error('purge needs an age, e.g. 7d')
        puts "purged #{QueueDispatcher.purge(older_than: age)} finished task(s)"
        0
      else usage_error("unknown command #{command.inspect}")
      end
    rescue OptionParser::ParseError => e
      usage_error(e.message)
    rescue QueueDispatcher::Error => e
      warn "queue_worker_dispatcher: #{e.message}"
      1
    end

    private

    def env_f(name)
      v = ENV.fetch(name, nil)
      v && !v.empty? ? Float(v) : nil
    end

    def env_i(name)
      v = ENV.fetch(name, nil)
      v && !v.empty? ? Integer(v) : nil
    end

    def usage_error(msg)
      warn "queue_worker_dispatcher: #{msg}\n\n#{USAGE}"
      2
    end

    def parser
      OptionParser.new do |o|
        o.banner = USAGE
        o.separator ''
        o.separator 'Options:'
        o.on('-w', '--workers N', Integer, 'worker threads per process (default 10)') { |v| @opts[:workers] = v }
        o.on('-r', '--require FILE', 'load the application (repeatable; default: ./config/environment.rb if present)') { |v| @opts[:requires] << v }
        o.on('--db PATH', "database path, sqlite:// or postgres://user@host/db[?schema=S] URL (default: $#{Native::DB_ENV}, else ./#{Native::DEFAULT_DB})") { |v| @opts[:db] = v }
        o.on('--queues A,B', Array, 'serve only these named queues (and no unqueued tasks unless --parallel)') { |v| @opts[:queues] = v }
        o.on('--[no-]parallel', 'serve tasks without a queue (default: yes, unless --queues is given)') { |v| @opts[:parallel] = v }
        o.on('-p', '--processes P', Integer, 'run P worker processes under one supervisor that restarts any that die') { |v| @opts[:processes] = v }
        o.on('-b', '--background', 'daemonize: detach, write the pid file, log to the log file') { @opts[:background] = true }
        o.on('--pidfile PATH', 'pid file for -b (default: tmp/pids/queue_worker_dispatcher.pid if tmp/pids exists, else ./queue_worker_dispatcher.pid)') { |v| @opts[:pidfile] = v }
        o.on('--log PATH', 'log file for -b (default: log/queue_worker_dispatcher.log if log/ exists, else ./queue_worker_dispatcher.log)') { |v| @opts[:logfile] = v }
        o.on('--grace SECONDS', Float, 'on SIGTERM/SIGINT, how long running tasks may finish (default 30)') { |v| @opts[:grace] = v }
        o.on('--lease SECONDS', Float, 'lease: a dispatcher silent this long is declared dead (default 15; env QUEUE_DISPATCHER_LEASE)') { |v| @opts[:lease] = v }
        o.on('--heartbeat SECONDS', Float, 'heartbeat interval (default 1, at most lease/2; env QUEUE_DISPATCHER_HEARTBEAT)') { |v| @opts[:heartbeat] = v }
        o.on('--max-lost N', Integer, 'lost runs (dead dispatchers) before a task is aborted (default 5; env QUEUE_DISPATCHER_MAX_LOST)') { |v| @opts[:max_lost] = v }
        o.on('--retry-base SECONDS', Float, 'first retry delay, doubled per attempt (default 1)') { |v| @opts[:retry_base] = v }
        o.on('--verbose', 'log every task, not only failures') { @opts[:verbose] = true }
        o.on('--child', '(internal) a worker process started by --processes') { @opts[:child] = true }
        o.on('-v', '--version', 'print the version') do
          puts "queue_worker_dispatcher #{QueueDispatcher::VERSION}"
          exit 0
        end
        o.on('-h', '--help', 'print this help') do
          puts o
          exit 0
        end
      end
    end

    def start
      raise QueueDispatcher.invalid('workers', 'must be at least 1') unless @opts[:workers].positive?
      raise QueueDispatcher.invalid('processes', 'must be at least 1') unless @opts[:processes].positive?

      if @opts[:background]
        pidfile = @opts[:pidfile] || default_path('tmp/pids', 'queue_worker_dispatcher.pid')
        # Refuse before detaching, so a second start fails where the user sees it.
        Native::PidFile.acquire(pidfile).release
        logfile = File.expand_path(@opts[:logfile] || default_path('log', 'queue_worker_dispatcher.log'))
        pidfile = File.expand_path(pidfile)
        # Daemonize before the engine opens anything: engine threads do not survive fork.
        Process.daemon(true, true)
        $stdin.reopen(File::NULL)
        $stdout.reopen(logfile, 'a')
        $stderr.reopen($stdout)
        $stdout.sync = true
        @pid = Native::PidFile.acquire(pidfile)
      end
      @logger = Logger.new($stdout, progname: "queue_worker_dispatcher[#{Process.pid}]")
      @self_r, @self_w = IO.pipe
      %w[TERM INT].each { |sig| Signal.trap(sig) { signal(sig) } }
      @opts[:processes] > 1 && !@opts[:child] ? supervise : serve
    ensure
      @pid&.release
    end

    def default_path(dir, file)
      File.directory?(dir) ? File.join(dir, file) : file
    end

    # Trap context: only write to the self-pipe (no Mutex, no I/O beyond this).
    def signal(sig)
      @self_w.write_nonblock(sig[0], exception: false)
    end

    def load_application
      files = @opts[:requires]
      files = [File.expand_path('config/environment.rb')] if files.empty? && File.exist?('config/environment.rb')
      files.each { |f| require File.expand_path(f) }
      # Rails autoloads lazily: load every job class so the registry knows them.
      ::Rails.application.eager_load! if defined?(::Rails) && ::Rails.respond_to?(:application) && ::Rails.application
    end

    def serve
      load_application
      parallel = @opts[:parallel].nil? ? @opts[:queues].nil? : @opts[:parallel]
      runner = Runner.new(workers: @opts[:workers], queues: @opts[:queues], parallel: parallel,
                          lease: @opts[:lease], heartbeat: @opts[:heartbeat], max_lost: @opts[:max_lost],
                          retry_base: @opts[:retry_base], logger: @logger, verbose: @opts[:verbose])
      runner.start
      @logger.info("started: #{@opts[:workers]} workers on #{QueueDispatcher.store.describe}" \
                   "#{@opts[:queues] ? ", queues #{@opts[:queues].join(',')}" : ''} (pid #{Process.pid})")
      signals = 0
      deadline = nil
      supervisor = Process.ppid if @opts[:child]
      loop do
        title(runner)
        ready = IO.select([@self_r], nil, nil, deadline ? 0.05 : 1.0)
        got = ready ? @self_r.read_nonblock(64, exception: false) : nil
        got = '' unless got.is_a?(String)
        # A --processes child whose supervisor died stops like on SIGTERM.
        got = 'T' if supervisor && signals.zero? && Process.ppid != supervisor
        unless got.empty?
          got.each_char do
            signals += 1
            if signals == 1
              @logger.info("stopping: no more claims; running tasks have #{@opts[:grace]}s to finish (signal again to leave at once)")
              runner.stop_claiming
              deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + @opts[:grace]
            end
          end
        end
        if signals >= 2
          @logger.warn("leaving at once: #{runner.running} running task(s) go back to the queue")
          runner.shutdown_now
          return 1
        end
        # A worker thread that died (Thread#kill from task code, a bug) is replaced.
        runner.revive if signals.zero?
        next unless deadline

        if runner.alive_threads.zero? || Process.clock_gettime(Process::CLOCK_MONOTONIC) >= deadline
          left = runner.running
          runner.stop(grace: 0)
          @logger.info(left.zero? ? 'stopped' : "stopped after the grace period: #{left} task(s) go back to the queue")
          return 0
        end
      end
    end

    def title(runner)
      Process.setproctitle("queue_worker_dispatcher: #{runner.running}/#{@opts[:workers]} busy" \
                           "#{@opts[:child] ? ' (child)' : ''} #{QueueDispatcher.store.describe}")
    end

    # --processes: the supervisor never opens the engine; children are exec'ed (not forked) and
    # restarted when they die, until a signal asks everyone to stop.
    def supervise
      argv = child_argv
      program = File.expand_path($PROGRAM_NAME)
      children = {}
      spawn_child = lambda do
        # Own process group: a terminal Ctrl-C reaches only the supervisor, which forwards it once.
        pid = Process.spawn(RbConfig.ruby, program, *argv, pgroup: true)
        children[pid] = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        @logger.info("started worker process #{pid}")
      end
      @opts[:processes].times { spawn_child.call }
      signals = 0
      loop do
        Process.setproctitle("queue_worker_dispatcher: supervisor of #{children.size} processes")
        ready = IO.select([@self_r], nil, nil, 0.5)
        if ready
          got = @self_r.read_nonblock(64, exception: false)
          got = '' unless got.is_a?(String)
          got.each_char do
            signals += 1
            children.each_key { |pid| kill('TERM', pid) }
          end
        end
        while (pid = reap)
          started = children.delete(pid)
          next if signals.positive?

          @logger.warn("worker process #{pid} died (#{$CHILD_STATUS}); restarting")
          # A child that dies at once (bad -r file, locked database) is restarted at most once a second.
          sleep 1 if started && Process.clock_gettime(Process::CLOCK_MONOTONIC) - started < 1
          spawn_child.call
        end
        return 0 if signals.positive? && children.empty?
      end
    end

    def reap
      Process.wait(-1, Process::WNOHANG)
    rescue Errno::ECHILD
      nil
    end

    def kill(sig, pid)
      Process.kill(sig, pid)
    rescue Errno::ESRCH
      nil
    end

    def child_argv
      a = ['--child', '-w', @opts[:workers].to_s, '--grace', @opts[:grace].to_s]
      @opts[:requires].each { |f| a += ['-r', File.expand_path(f)] }
      a += ['--db', @opts[:db]] if @opts[:db]
      a += ['--queues', @opts[:queues].join(',')] if @opts[:queues]
      a << (@opts[:parallel] ? '--parallel' : '--no-parallel') unless @opts[:parallel].nil?
      a += ['--lease', @opts[:lease].to_s] if @opts[:lease]
      a += ['--heartbeat', @opts[:heartbeat].to_s] if @opts[:heartbeat]
      a += ['--max-lost', @opts[:max_lost].to_s] if @opts[:max_lost]
      a += ['--retry-base', @opts[:retry_base].to_s] if @opts[:retry_base]
      a << '--verbose' if @opts[:verbose]
      a
    end
  end
end
