"""A thread pool for the compiled CPU decode kernels that stays awake between the calls of one decode step.

Under OMP_WAIT_POLICY=PASSIVE, which keeps PyTorch fast on a shared machine, an OpenMP thread sleeps in
the kernel as soon as it waits, and waking it costs from a few to over 80 µs, at random. A decode step
calls ~60 kernels of 100-300 µs each (the FFN and attention kernels of every layer) and each meets the
other threads two or three times, so OpenMP's sleeps cost a decode step of SmolLM2 a fifth of its time
(30 dense FFN kernel calls: 15.4 ms under PASSIVE, 12.8 ms spinning, on this machine's 2 cores). The
pool's workers spin for `SPIN_US` after each task (yielding the core to anyone else who wants it), which
covers the Python between two kernel calls, and only then sleep; inside a task the threads meet at a
spin barrier. Spinning is bounded, so an idle process or a busy machine loses at most that much per
call. Tasks split their work by (thread, threads) exactly as under OpenMP, so results are the same bits.

`attach(lib)` points a kernel library (one built with `CLIENT` in its source) at the pool, shared by every
kernel of the process; without it, or with ACTSPARSE_POOL=0, or when the pool cannot be built, the
kernels run their tasks in OpenMP regions.
"""

from __future__ import annotations

import ctypes
import os

from actsparse.speed.kernels import cbuild

__all__ = ["CLIENT", "SPIN_US", "attach"]

SPIN_US = 200
"""Microseconds a worker spins for the next task before it sleeps."""

_RELAX = r"""
#include <sched.h>
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
/* one turn of a wait that spins a while, then yields the core at each turn */
static inline void back_off(long spins) {
    if (spins > 4000) sched_yield();
    else cpu_relax();
}
"""

CLIENT = (
    _RELAX
    + r"""
#include <omp.h>
/* The kernels' side of `cpu_pool`: parallel(task, arg, nt) runs task(arg, t, nt) for t < nt, on the pool when
   one is attached, else in an OpenMP region; spin_barrier(&b, nt) makes the nt threads of one task meet. */
typedef void (*pool_task)(void *, int, int);
typedef void (*pool_run_fn)(pool_task, void *, int);
static pool_run_fn pool_run = 0;
void actsparse_set_pool(void *run) { pool_run = (pool_run_fn)run; }
static void parallel(pool_task task, void *arg, int nt) {
    if (nt <= 1) { task(arg, 0, 1); return; }
    if (nt > 64) nt = 64;
    if (pool_run) { pool_run(task, arg, nt); return; }
#pragma omp parallel num_threads(nt)
    task(arg, omp_get_thread_num(), nt);
}
typedef struct { int count, phase; } spin_barrier_t;
static void spin_barrier(spin_barrier_t *b, int nt) {
    if (nt <= 1) return;
    int phase = __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->phase, phase + 1, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->phase, __ATOMIC_ACQUIRE) == phase; spins++) back_off(spins);
}
"""
)
"""C source a kernel library includes to run its tasks on the pool (`parallel`, `spin_barrier`)."""

_SOURCE = (
    _RELAX
    + r"""
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define MAXW 63
typedef void (*pool_task)(void *, int, int);

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER; /* one task at a time */
static int workers = 0;
static long gen = 0;      /* task generation, read by the workers */
static pool_task task_fn;
static void *task_arg;
static int task_nt;
static int done = 0;      /* workers finished with the current task */
static long spin_ns = 200000;
static long born[MAXW]; /* the generation each worker was started at: it waits for the next one */

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *worker(void *p) {
    int id = (int)(intptr_t)p; /* thread index id + 1 of a task */
    long seen = born[id];
    for (;;) {
        long start = now_ns();
        for (long spins = 0; __atomic_load_n(&gen, __ATOMIC_ACQUIRE) == seen; spins++) {
            if ((spins & 63) == 0 && now_ns() - start > spin_ns) {
                pthread_mutex_lock(&mu);
                while (__atomic_load_n(&gen, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&cv, &mu);
                pthread_mutex_unlock(&mu);
                break;
            }
            if ((spins & 1023) == 1023) sched_yield();
            else cpu_relax();
        }
        seen = __atomic_load_n(&gen, __ATOMIC_ACQUIRE);
        if (id + 1 < task_nt) {
            task_fn(task_arg, id + 1, task_nt);
            __atomic_add_fetch(&done, 1, __ATOMIC_ACQ_REL);
        }
    }
    return 0;
}

static void after_fork(void) { workers = 0; } /* a child has none of the parent's threads */

void actsparse_pool_spin(long us) { spin_ns = us * 1000L; }

void actsparse_pool_run(pool_task fn, void *arg, int nt) {
    pthread_mutex_lock(&run_mu);
    static int registered = 0;
    if (!registered) { pthread_atfork(0, 0, after_fork); registered = 1; }
    if (nt > MAXW + 1) nt = MAXW + 1;
    while (workers < nt - 1) {
        pthread_t th;
        born[workers] = gen;
        if (pthread_create(&th, 0, worker, (void *)(intptr_t)workers) != 0) break;
        pthread_detach(th);
        workers++;
    }
    if (nt > workers + 1) nt = workers + 1;
    task_fn = fn;
    task_arg = arg;
    task_nt = nt;
    __atomic_store_n(&done, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&mu);
    __atomic_add_fetch(&gen, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    fn(arg, 0, nt);
    for (long spins = 0; __atomic_load_n(&done, __ATOMIC_ACQUIRE) < nt - 1; spins++) back_off(spins);
    pthread_mutex_unlock(&run_mu);
}
"""
)


def _declare(lib: ctypes.CDLL) -> None:
    lib.actsparse_pool_spin.argtypes = [ctypes.c_long]
    lib.actsparse_pool_spin.restype = None


def _pool() -> ctypes.CDLL | None:
    if os.environ.get("ACTSPARSE_POOL") == "0":
        return None
    lib = cbuild.load("cpu_pool", _SOURCE, _declare, flags=(*cbuild.FLAGS, "-pthread"))
    if lib is not None:
        lib.actsparse_pool_spin(SPIN_US)
    return lib


def attach(lib: ctypes.CDLL) -> None:
    """Run the tasks of kernel library `lib` on the process's pool (when there is one)."""
    pool = _pool()
    if pool is not None:
        lib.actsparse_set_pool.argtypes = [ctypes.c_void_p]
        lib.actsparse_set_pool(ctypes.cast(pool.actsparse_pool_run, ctypes.c_void_p))
