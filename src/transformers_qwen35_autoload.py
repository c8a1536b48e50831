"""Activation on install: a Python process that uses transformers' Qwen3.5 entry points gets transformers_qwen35.

``pip install transformers-qwen35`` puts ``transformers_qwen35_autoload.pth`` into site-packages. Python's ``site``
runs its one line at every interpreter start, and that line imports this module, so this module must stay tiny and
import nothing that is not loaded at start-up anyway (``os``, ``sys``, ``_thread``): it adds one finder to
``sys.meta_path`` and nothing else. The finder answers for a few module names
only, and for them only wraps the real loader so that we hear when the module has finished executing:

- ``transformers``: its top-level module (a lazy module) is given a ``__getattr__`` that activates the package the
  first time one of the names that lead to a Qwen3.5 model is looked up: the ``Auto*`` factories, ``pipeline``, the
  ``MODEL_*`` mappings and the ``Qwen3_5*`` classes (TRL and ``transformers serve`` resolve
  ``config.architectures[0]`` with ``getattr(transformers, ...)``). ``import transformers`` alone costs nothing more;
  a process that looks up ``AutoTokenizer`` pays for importing this package (torch and transformers' modelling code).
- ``transformers.models.auto.{configuration,modeling,processing,tokenization}_auto``: code that imports the factories
  from there rather than from the top level activates the package when such a module is done, unless some
  transformers module is still half-imported at that moment (our import would then meet it half-built); the
  top-level lookup above is the route in that case.
- ``transformers.processing_utils``: importing it executes ``transformers/__init__.py`` a second time and puts the new
  module object in ``sys.modules``; that one is watched too. Registration sets the ``Qwen3_5*`` names on every
  ``transformers`` module object seen, so code holding the first one (``import transformers`` at its top) is served.

Activating is ``import transformers_qwen35``, whose ``register()`` points the Auto* factories, ``AutoProcessor``,
``AutoTokenizer``'s chat-template fallback, PEFT's LoRA defaults and the top-level ``transformers.Qwen3_5*`` names
at this package. The modules under ``transformers.models.qwen3_5`` are never touched: they stay the built-in reference.

``TRANSFORMERS_QWEN35_AUTOLOAD=0`` (or ``false`` / ``no`` / ``off``) switches all of this off; it is read at start-up
and again at the moment of activation, so setting it in ``os.environ`` before the first transformers lookup works
too. An explicit ``import transformers_qwen35`` activates the package whatever the variable says.
"""

import _thread
import os
import sys

__all__ = ["ENV", "activate", "enabled", "install", "seen_modules"]

ENV = "TRANSFORMERS_QWEN35_AUTOLOAD"
_OFF = ("0", "false", "no", "off")

_TOP_LEVEL = "transformers"
_AUTO_MODULES = frozenset(
    f"transformers.models.auto.{name}"
    for name in ("configuration_auto", "modeling_auto", "processing_auto", "tokenization_auto")
)
# transformers.processing_utils executes transformers/__init__.py a second time, and that second module object
# replaces the first in sys.modules: it is watched too once processing_utils is done.
_PROCESSING_UTILS = "transformers.processing_utils"
_WATCHED = _AUTO_MODULES | {_TOP_LEVEL, _PROCESSING_UTILS}

# "idle" until the first activation attempt; "busy" while importing the package; "done" afterwards (also after a
# failed attempt, which warns once instead of failing again at every lookup).
_state = "idle"
# Another thread that looks up a factory while one thread activates waits for it, so it never gets built-in's classes
# half-way through. Re-entrant: the activating thread's own lookups pass. Bounded: a thread that holds an import lock
# the activation needs (importing PEFT, say) must not deadlock with it; after the wait it goes on, with a warning.
_activation_lock = _thread.RLock()
ACTIVATION_WAIT_S = 60
# Every `transformers` module object seen (see _PROCESSING_UTILS for why there can be two): each is given the
# activating __getattr__ until activation, and registration publishes the Qwen3_5* names on each.
seen_modules = []


def enabled() -> bool:
    """Whether activation on install is on (``TRANSFORMERS_QWEN35_AUTOLOAD`` is unset or not a "no")."""
    return os.environ.get(ENV, "").strip().lower() not in _OFF


def _leads_to_qwen35(name: str) -> bool:
    """Top-level transformers names whose lookup can end in a Qwen3.5 model, config, processor or tokenizer."""
    return name.startswith(("Auto", "MODEL_", "Qwen3_5")) or name == "pipeline"


def activate() -> None:
    """Import ``transformers_qwen35`` (which registers it), once; a failure is a warning, never an import error."""
    global _state
    if _state == "done" or not enabled():
        return
    if not _activation_lock.acquire(timeout=ACTIVATION_WAIT_S):
        _warn(f"another thread has been activating transformers_qwen35 for {ACTIVATION_WAIT_S} s; this lookup goes on "
              "without waiting and may get transformers' built-in Qwen3.5 classes.")  # fmt: skip
        return
    try:
        if _state != "idle":  # "busy": this thread's own lookups while it imports the package; "done": finished
            return
        if "transformers_qwen35" in sys.modules:  # imported explicitly (perhaps still importing): registers itself
            _state = "done"
            return
        _state = "busy"
        try:
            import transformers_qwen35  # noqa: F401  (registers on import)
        except Exception as error:  # a broken install must not break every program that imports transformers
            _warn(
                f"transformers_qwen35 could not be activated ({type(error).__name__}: {error}); transformers' "
                f"built-in Qwen3.5 classes are in use. `import transformers_qwen35` shows the full error; {ENV}=0 "
                "turns activation on install off."
            )
        finally:
            _state = "done"
        _unwatch_top_level()
    finally:
        _activation_lock.release()


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _transformers_half_imported(except_name: str) -> bool:
    """Whether a transformers module other than ``except_name`` is still executing its import."""
    for name, module in list(sys.modules.items()):
        if name != except_name and (name == _TOP_LEVEL or name.startswith("transformers.")):
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return True
    return False


def _watch_top_level(module) -> None:
    """Give the (lazy) ``transformers`` module a ``__getattr__`` that activates us before resolving our names."""
    base = type(module)
    if getattr(base, "_transformers_qwen35_watch", False):
        return

    class WatchedTransformers(base):
        _transformers_qwen35_watch = True

        def __getattr__(self, name):
            if _leads_to_qwen35(name):
                activate()
                if name in self.__dict__:  # set by register() while activating
                    return self.__dict__[name]
            resolve = getattr(base, "__getattr__", None)
            if resolve is None:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
            return resolve(self, name)

    WatchedTransformers.__name__ = base.__name__
    WatchedTransformers.__qualname__ = base.__qualname__
    seen_modules.append(module)
    try:
        module.__class__ = WatchedTransformers
    except TypeError:  # a module type that refuses class assignment: the auto-module route still activates us
        pass


def _unwatch_top_level() -> None:
    for module in seen_modules:
        if getattr(type(module), "_transformers_qwen35_watch", False):
            module.__class__ = type(module).__mro__[1]


def _after_import(name: str) -> None:
    if _state != "idle" or not enabled():
        return
    try:
        if name in (_TOP_LEVEL, _PROCESSING_UTILS):
            module = sys.modules.get(_TOP_LEVEL)  # transformers replaces itself in sys.modules with its lazy module
            if module is not None:
                _watch_top_level(module)
        elif not _transformers_half_imported(name):
            activate()
    except Exception as error:  # the import of transformers itself must never fail because of this hook
        _warn(f"transformers_qwen35's activation hook failed ({type(error).__name__}: {error}); {ENV}=0 turns it off.")


class _NotifyingLoader:
    """The real loader, unchanged, plus a call to ``_after_import`` once the module has executed."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _after_import(self._name)

    def __getattr__(self, attribute):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, attribute)


class _Finder:
    """A ``sys.meta_path`` finder that finds nothing itself: it wraps the loader of the watched modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED or _state != "idle":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader, fullname)
                return spec
        return None

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent; nothing when switched off)."""
    if not enabled() or any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    if _TOP_LEVEL in sys.modules:  # installed late (not from the .pth): watch the module that is already there
        _watch_top_level(sys.modules[_TOP_LEVEL])


install()
