# frozen_string_literal: true

# queue_dispatcher for Ruby: enqueue method calls of opted-in job classes and run them in a
# separate dispatcher process (`queue_worker_dispatcher`). The engine (Rust, shared with the
# Python front end) owns every rule; this library converts values and drives its worker API.
#
#   class LongRunningMailJob
#     include QueueDispatcher::Job
#     def self.send_mail(to = nil, subject: nil) = ...
#   end
#   task = LongRunningMailJob.enqueue(queue: 'mail').send_mail('a@b.c', subject: 'hi')

require 'json'
require 'queue_dispatcher/queue_dispatcher_native'
require 'queue_dispatcher/version'
require 'queue_dispatcher/errors'
require 'queue_dispatcher/rc_and_msg'
require 'queue_dispatcher/registry'
require 'queue_dispatcher/task'
require 'queue_dispatcher/proxy'
require 'queue_dispatcher/python_task'
require 'queue_dispatcher/job'
require 'queue_dispatcher/runner'

module QueueDispatcher
  @lock = Mutex.new
  @store = nil
  @store_pid = nil
  @database = nil

  class << self
    # Database for enqueuers and dispatchers of this process: a path or sqlite:// URL. Defaults to
    # $QUEUE_DISPATCHER_DB, else ./queue_dispatcher.db.
    attr_reader :database

    def database=(path)
      @lock.synchronize do
        @database = path&.to_s
        @store = nil
      end
    end

    # The engine handle of this process (reopened after fork: connections never cross a fork).
    def store
      s = @store
      return s if s && @store_pid == Process.pid

      @lock.synchronize do
        if @store.nil? || @store_pid != Process.pid
          @store = Native::Store.open(@database)
          @store_pid = Process.pid
          start_gvl_peer
        end
        @store
      end
    end

    # Runs the block as one batch: everything it enqueues (and links with `dependent_tasks =`)
    # becomes visible to workers together when the block ends, or not at all if it raises.
    # Keep it short: it holds the database's write lock. Batches nest.
    def batch
      s = store
      s.batch_begin
      ended = false
      begin
        result = yield
        ended = true
        s.batch_end(true)
        result
      rescue Exception # rubocop:disable Lint/RescueException -- roll back on any exception, re-raised
        unless ended
          ended = true
          s.batch_end(false)
        end
        raise
      ensure
        # break / next / throw out of the block: the block ended normally, keep its tasks.
        s.batch_end(true) unless ended
      end
    end

    # The task being run by the current worker thread (nil outside a task).
    def current_task
      Thread.current[:queue_dispatcher_context]&.task
    end

    # Progress of the current task, visible to every reader while it runs (coalesced to ~10
    # writes per second). The original gem's name and keywords.
    def update_message(msg: nil, perc_finished: nil)
      ctx = Thread.current[:queue_dispatcher_context]
      raise Error, 'update_message called outside a running task' unless ctx

      ctx.progress(msg, perc_finished)
    end

    # nil while the current task may go on; :cancelled, :reset or :timeout once it should stop
    # (threads cannot be killed safely: long tasks should poll this).
    def cancelled?
      Thread.current[:queue_dispatcher_context]&.cancelled
    end

    # Admin helpers on the current database.
    def status_report = store.status_report
    def dispatcher_alive? = store.dispatcher_alive?
    def counts = store.counts
    def pause(queue) = store.pause(queue.to_s)
    def resume(queue) = store.resume(queue.to_s)

    # Aborts every unfinished task (the original reset_immediately!); returns how many.
    def reset! = store.reset

    # Deletes finished tasks older than `age` (seconds or '7d'); returns how many.
    def purge(older_than:)
      secs = older_than.is_a?(Numeric) ? older_than.to_f : Native.parse_age(older_than.to_s)
      store.purge(secs)
    end

    # Tasks as QueueDispatcher::Task objects; filters: states:, queue: (false: no queue),
    # meta: { key => value }, limit:, offset:, descending:.
    def tasks(**filter)
      store.list(filter.empty? ? nil : filter).map { |h| Task.new(h[:id], h) }
    end

    # Ruby 3.1 makes a process's only thread pay 20-50 us each time it releases the GVL (0.1 us
    # as soon as any other Ruby thread exists; measured here), and every engine call releases
    # it. One parked thread per process keeps a single-threaded enqueuer at engine speed. It never
    # wakes, holds nothing, and does not hide real deadlocks (it sleeps forever too).
    def start_gvl_peer
      return if @gvl_peer&.alive?

      @gvl_peer = Thread.new { loop { sleep } }
      @gvl_peer.name = 'qd-gvl-peer'
      @gvl_peer.report_on_exception = false
    end

    # @api private
    def after_fork
      @store = nil
      @store_pid = nil
    end
  end

  # Connections must never be used across fork (app servers preload, then fork): the engine
  # holds its transactions and SQLite's global locks across the fork, and the child reopens.
  module ForkHook
    def _fork
      QueueDispatcher::Native.before_fork
      pid = nil
      begin
        pid = super
      ensure
        QueueDispatcher::Native.after_fork(pid == 0)
      end
      QueueDispatcher.after_fork if pid.zero?
      pid
    end
  end
  Process.singleton_class.prepend(ForkHook) if Process.respond_to?(:_fork)
end
