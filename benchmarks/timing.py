"""GPU timers shared by the kernel benchmarks: wall time between CUDA events, and the kernels' own time."""

import statistics

import torch


def time_ms(fn, reps: int, warmup: int = 10, flush: bool = True) -> float:
    """Median milliseconds of `fn()` over `reps` runs, each between two CUDA events: a wall time, which includes the
    host's launch time wherever the GPU waits for it. The L2 cache is flushed before each run unless `flush` is
    False."""
    scratch = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if flush else None  # larger than the L2
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if scratch is not None:
            scratch.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def gpu_ms(fn, reps: int) -> float:
    """Mean milliseconds of GPU kernel time of `fn()` over `reps` back-to-back runs (torch.profiler, L2 warm), host
    time left out: what the op costs inside a step whose host runs ahead of the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / reps / 1000
