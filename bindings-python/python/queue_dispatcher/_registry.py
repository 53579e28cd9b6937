"""The registry of runnable tasks, filled when a program imports its task modules: functions
decorated with `task` and public methods of classes decorated with `job`. A worker resolves a
stored target only by one exact-string lookup here, so a row can never name anything else (no
import, no getattr along a path from the row, no name starting with ``_``)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import inspect
from collections.abc import Iterable
from typing import Any, Callable, Generic, Optional, TypeVar, Union, overload

from queue_dispatcher._native import InvalidInputError, Registered, Store, Template
from queue_dispatcher._store import get_store
from queue_dispatcher._task import Task, TaskLike, _ids

R = TypeVar("R")
C = TypeVar("C", bound=type)

#: target name -> registration; the worker threads read this very dict.
REGISTRY: dict[str, Registered] = {}

_OPTIONS = frozenset(("queue", "priority", "retries", "timeout", "delay", "run_at", "unique_key", "meta", "depends_on"))
Callback = Callable[[Task], Any]


def registered_names() -> list[str]:
    """Every target this process can run, sorted."""
    return sorted(REGISTRY)


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown task option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_OPTIONS))})")


def _template(target: str, options: dict[str, Any], runtime: str = "python", receiver: Any = None) -> Template:
    opts = dict(options)
    run_at = opts.pop("run_at", None)
    micros: Optional[int] = None
    if isinstance(run_at, _dt.datetime):
        micros = int(run_at.timestamp() * 1_000_000)
    elif run_at is not None:
        micros = int(float(run_at) * 1_000_000)
    depends: Union[TaskLike, Iterable[TaskLike], None] = opts.pop("depends_on", None)
    return Template(target, runtime=runtime, receiver=receiver, run_at=micros, depends_on=_ids(depends) if depends is not None else [], **opts)


def _target_name(obj: Any, name: Optional[str], what: str) -> str:
    if name is not None:
        return name
    module, qualname = obj.__module__, obj.__qualname__
    if module == "__main__":
        raise InvalidInputError(
            f"{what} {qualname} is defined in __main__, which a worker cannot import under that name: "
            f"move it into a module, or give it an explicit name= (e.g. name=\"myapp.jobs:{qualname}\")"
        )
    if "<locals>" in qualname:
        raise InvalidInputError(f"{what} {qualname} is defined inside a function: tasks must be importable module-level objects")
    return f"{module}:{qualname}"


def _runnable(func: Callable[..., Any]) -> Callable[..., Any]:
    """What a worker thread calls: the function itself, or for ``async def`` a function that runs
    the coroutine to completion on its own event loop."""
    if not inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    def run_coroutine(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(func(*args, **kwargs))

    return run_coroutine


def _register(target: str, func: Callable[..., Any], on_success: Optional[Callback], on_error: Optional[Callback]) -> None:
    entry = Registered(target, _runnable(func), on_success, on_error)
    existing = REGISTRY.get(target)
    if existing is not None:
        old = getattr(existing.func, "__qualname__", None), getattr(existing.func, "__module__", None)
        new = getattr(func, "__qualname__", None), getattr(func, "__module__", None)
        if old != new:
            raise InvalidInputError(f"task name {target!r} is already registered (to {existing.func!r}); choose another name=")
    REGISTRY[target] = entry


class TaskFunction(Generic[R]):
    """A function registered as a task. Calling it runs it here and now; `enqueue` stores a call
    for a worker."""

    def __init__(self, func: Callable[..., R], name: str, options: dict[str, Any],
                 on_success: Optional[Callback], on_error: Optional[Callback]) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.name = name
        self.options = options
        self.on_success = on_success
        self.on_error = on_error
        self._template = _template(name, options)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.func(*args, **kwargs)

    def enqueue(self, *args: Any, **kwargs: Any) -> Task:
        """Enqueues ``func(*args, **kwargs)`` with the decorator's options; the task is stored
        (durable) when this returns. Arguments must be JSON values."""
        store = get_store()
        return Task(store.enqueue(self._template, args, kwargs), store)

    def enqueue_with(self, *, store: Optional[Store] = None, **options: Any) -> Callable[..., Task]:
        """Returns an enqueue function with some options overridden for these calls: queue,
        priority, retries, timeout (s), delay (s), run_at (datetime or epoch seconds),
        unique_key, meta (dict), depends_on (tasks or ids); ``store`` picks another database."""
        _check_options(options)
        template = _template(self.name, {**self.options, **options})

        def enqueue(*args: Any, **kwargs: Any) -> Task:
            s = store if store is not None else get_store()
            return Task(s.enqueue(template, args, kwargs), s)

        return enqueue

    def __repr__(self) -> str:
        return f"<TaskFunction {self.name}>"


@overload
def task(func: Callable[..., R], /) -> TaskFunction[R]: ...
@overload
def task(*, name: Optional[str] = ..., on_success: Optional[Callback] = ..., on_error: Optional[Callback] = ...,
         **options: Any) -> Callable[[Callable[..., R]], TaskFunction[R]]: ...


def task(func: Optional[Callable[..., R]] = None, /, *, name: Optional[str] = None,
         on_success: Optional[Callback] = None, on_error: Optional[Callback] = None,
         **options: Any) -> Any:
    """Registers a module-level function as a task: ``@task`` or ``@task(queue="mail",
    priority=10, retries=3, timeout=60)``. Options: queue (named queues run one task at a time),
    priority (lower first, default 100), retries, timeout (s), delay (s), run_at, unique_key,
    meta, depends_on. ``on_success(task)`` / ``on_error(task)`` run in the worker after the final
    outcome is stored. ``name`` overrides the stored target ``module:qualname``."""
    _check_options(options)

    def decorate(f: Callable[..., R]) -> TaskFunction[R]:
        target = _target_name(f, name, "task")
        _register(target, f, on_success, on_error)
        return TaskFunction(f, target, options, on_success, on_error)

    if func is not None:
        return decorate(func)
    return decorate


class _OnFreshInstance:
    """Runs an instance method of a job class on a new instance (the method name was fixed at
    registration, never taken from a row)."""

    def __init__(self, cls: type, attr: str) -> None:
        self.cls = cls
        self.attr = attr
        self.__qualname__ = f"{cls.__qualname__}.{attr}"
        self.__module__ = cls.__module__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.cls(), self.attr)(*args, **kwargs)
        if inspect.iscoroutine(result):
            return asyncio.run(result)
        return result

    def __repr__(self) -> str:
        return f"<{self.__qualname__} on a fresh instance>"


class _JobInfo:
    __slots__ = ("cls", "methods", "options", "templates")

    def __init__(self, cls: type, methods: dict[str, str], options: dict[str, Any]) -> None:
        self.cls = cls
        self.methods = methods
        self.options = options
        self.templates = {attr: _template(target, options) for attr, target in methods.items()}


class JobProxy:
    """``JobClass.enqueue(queue="x")``: each registered method becomes an enqueue call,
    ``JobClass.enqueue(queue="x").send_mail(*args, **kwargs)`` returning a `Task`."""

    __slots__ = ("_info", "_options", "_store")

    def __init__(self, info: _JobInfo, options: dict[str, Any], store: Optional[Store]) -> None:
        self._info = info
        self._options = options
        self._store = store

    def __getattr__(self, attr: str) -> Callable[..., Task]:
        info = self._info
        target = info.methods.get(attr)
        if target is None:
            raise AttributeError(
                f"{info.cls.__qualname__} has no job method {attr!r} (jobs are the public methods defined in the class body)"
            )
        template = info.templates[attr] if not self._options else _template(target, {**info.options, **self._options})
        store = self._store

        def enqueue(*args: Any, **kwargs: Any) -> Task:
            s = store if store is not None else get_store()
            return Task(s.enqueue(template, args, kwargs), s)

        enqueue.__name__ = attr
        return enqueue

    def __repr__(self) -> str:
        return f"<JobProxy {self._info.cls.__qualname__} {self._options}>"


_RESERVED = frozenset(("enqueue", "on_success", "on_error"))


@overload
def job(cls: C, /) -> C: ...
@overload
def job(*, name: Optional[str] = ..., on_success: Optional[Callback] = ..., on_error: Optional[Callback] = ...,
        **options: Any) -> Callable[[C], C]: ...


def job(cls: Optional[C] = None, /, *, name: Optional[str] = None, on_success: Optional[Callback] = None,
        on_error: Optional[Callback] = None, **options: Any) -> Any:
    """Marks a class as a job, as in the original gem: every public method defined in its body
    (static, class or instance method; an instance method runs on a fresh ``cls()``) becomes a
    task ``module:Class.method``, enqueued with ``Class.enqueue(**options).method(*args)``.
    Callbacks come from the arguments or from ``on_success`` / ``on_error`` attributes."""
    _check_options(options)

    def decorate(c: C) -> C:
        base = _target_name(c, name, "job class")
        if "enqueue" in vars(c):
            raise InvalidInputError(f"job class {c.__qualname__} defines 'enqueue', which @job provides")
        success = on_success if on_success is not None else getattr(c, "on_success", None)
        error = on_error if on_error is not None else getattr(c, "on_error", None)
        methods: dict[str, str] = {}
        for attr, value in vars(c).items():
            if attr.startswith("_") or attr in _RESERVED:
                continue
            func: Callable[..., Any]
            if isinstance(value, staticmethod):
                func = value.__func__
            elif isinstance(value, classmethod):
                func = getattr(c, attr)
            elif inspect.isfunction(value):
                func = _OnFreshInstance(c, attr)
            else:
                continue
            target = f"{base}.{attr}"
            _register(target, func, success, error)
            methods[attr] = target
        info = _JobInfo(c, methods, options)

        def enqueue(klass: type, /, *, store: Optional[Store] = None, **opts: Any) -> JobProxy:
            _check_options(opts)
            return JobProxy(info, opts, store)

        setattr(c, "enqueue", classmethod(enqueue))
        return c

    if cls is not None:
        return decorate(cls)
    return decorate
