"""Tasks of the other language, named from Python: ``ruby_task("LongRunningMailJob.send_mail",
queue="mail").enqueue("a@b.c", subject="hi")`` stores a task that only Ruby dispatchers claim and
returns an ordinary `Task`. This process cannot see Ruby's registry, so only what the name shows
is checked here (syntax, no ``_`` names, no methods of Object/Kernel/BasicObject/Module/Class); a
name no Ruby dispatcher registered ends in ``error`` when it is claimed."""

from __future__ import annotations

from typing import Any, Callable, Optional

from queue_dispatcher._native import Store
from queue_dispatcher._registry import _check_options, _template
from queue_dispatcher._store import get_store
from queue_dispatcher._task import Task


class RubyTask:
    """A Ruby task by its name: ``Const.method`` (a class method) or ``Const#method`` with
    ``receiver=`` the id of the instance (found again with ``Const.find(id)``). Options as for
    Python tasks: queue, priority, retries, timeout, delay, run_at, unique_key, meta, depends_on."""

    __slots__ = ("target", "options", "receiver", "_store", "_template")

    def __init__(self, target: str, *, receiver: Any = None, store: Optional[Store] = None, **options: Any) -> None:
        _check_options(options)
        # Refuses a bad name, option or receiver now rather than at the first enqueue.
        self._template = _template(target, options, runtime="ruby", receiver=receiver)
        self.target = target
        self.options = options
        self.receiver = receiver
        self._store = store

    def enqueue(self, *args: Any, **kwargs: Any) -> Task:
        """Stores the call ``target(*args, **kwargs)``: JSON values; keyword arguments reach Ruby
        as keyword arguments. Durable when this returns (``delay`` counts from this call)."""
        store = self._store if self._store is not None else get_store()
        return Task(store.enqueue(self._template, args, kwargs), store)

    def enqueue_with(self, *, store: Optional[Store] = None, **options: Any) -> Callable[..., Task]:
        """The same task with some options replaced for these calls; returns an enqueue function."""
        _check_options(options)
        other = RubyTask(self.target, receiver=self.receiver, store=store if store is not None else self._store,
                         **{**self.options, **options})
        return other.enqueue

    def __repr__(self) -> str:
        return f"<RubyTask {self.target}>"


def ruby_task(target: str, *, receiver: Any = None, store: Optional[Store] = None, **options: Any) -> RubyTask:
    """A task that Ruby dispatchers run, by its name in their registry (``Const.method``, or
    ``Const#method`` with ``receiver=`` an instance id): ``ruby_task("LongRunningMailJob.send_mail",
    queue="mail").enqueue("a@b.c", subject="hi")`` returns a `Task`."""
    return RubyTask(target, receiver=receiver, store=store, **options)
