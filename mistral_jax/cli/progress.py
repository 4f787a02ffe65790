"""What the command lines say about one-time work: the CPU kernel's build, the compilations
(with their progress, before a server listens or a chat prompts), and how long they took, so
that a time to first token counts the first token only.

Compilation time is what JAX itself reports (`jax.monitoring` events for tracing, lowering
and XLA's compilation), summed from the moment `watch_compilation()` is called.
"""

from __future__ import annotations

import sys
import threading
import time

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
           "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")
_lock = threading.Lock()
_seconds = 0.0
_listening = False


def say(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def _heard(event: str, duration: float, **_) -> None:
    global _seconds
    if event in _EVENTS:
        with _lock:
            _seconds += duration


def watch_compilation() -> None:
    """Start summing the time JAX spends compiling (once per process)."""
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_heard)
        _listening = True


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling since `watch_compilation()`; compilations
    on other threads (a warm-up's) are summed too, so it may exceed the wall time."""
    with _lock:
        return _seconds


def build_kernel() -> float:
    """Build (or load) the CPU matmul kernel now, saying so when it compiles: seconds spent
    compiling it (0 when it was built already, or is not used)."""
    from mistral_jax import kernels

    if kernels.needs_build():
        say("building the CPU matmul kernel (once for this machine and jaxlib) ...")
    kernels.available()
    seconds = kernels.build_seconds()
    if seconds:
        say(f"built the CPU matmul kernel in {seconds:.1f} s")
    return seconds


def warm_up(engine) -> None:
    """`engine.warm_up()`, each compilation reported as it finishes."""
    start = time.perf_counter()
    say(f"compiling the decode step ({len(engine.decode_widths)} widths) and each prefill "
        "width ...")

    def report(done: int, total: int, what: str, seconds: float) -> None:
        say(f"  ({done}/{total}) {what}: {seconds:.1f} s")

    engine.warm_up(report)
    say(f"compiled in {time.perf_counter() - start:.1f} s")
