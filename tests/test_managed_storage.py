"""Storage modes: the managed-memory plans (chunk offsets, page alignment, placement, prefetch ranges)
checked on the CPU, the persistent/transient rule of the storage layer, the refusal of the managed mode
on CPU members, and, where a GPU exists, managed chunks placed, tagged, oversubscribed and prefetched as
planned while torch's memory statistics keep working."""

from __future__ import annotations

import logging

import pytest
import torch

from ms_splatfacto.backend import cuda_storage, managed_plan
from ms_splatfacto.backend.aggregate import members
from ms_splatfacto.backend.aggregate.layout import even_bounds, even_layout
from ms_splatfacto.backend.aggregate.members import Members, StorageModeError
from ms_splatfacto.backend.aggregate.storage import (
    ContiguousStorage,
    ManagedStorage,
    PerMemberStorage,
    is_persistent,
    prefetch,
    storage_for,
)
from ms_splatfacto.backend.aggregate.tensor import per_member_execution, wrap
from ms_splatfacto.backend.managed_plan import HOST, PAGE_BYTES

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# --- chunk offsets and page alignment -------------------------------------------------------------------

def test_chunk_spans_small_example():
    spans, total = managed_plan.chunk_spans([3, 0, 2, 5], row_bytes=1000, page=4 * KIB)
    assert spans == [(0, 3000), (4096, 0), (4096, 2000), (8192, 5000)]
    assert total == 16384  # whole pages: 8192 + 5000 rounded up


@pytest.mark.parametrize("rows", [0, 1, 999, 1_000_003, 20_000_000])
@pytest.mark.parametrize("row_shape,dtype", [((3,), torch.float32), ((16, 3), torch.float32), ((), torch.float16),
                                             ((59,), torch.float32), ((2,), torch.int64)])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_chunks_start_on_pages_and_never_share_one(rows, row_shape, dtype, n):
    row_bytes = torch.empty((1, *row_shape), dtype=dtype).nbytes
    bounds = even_bounds(rows, n)
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    spans, total = managed_plan.chunk_spans(counts, row_bytes)
    assert [size for _, size in spans] == [c * row_bytes for c in counts]
    ends = [offset + size for offset, size in spans]
    for d, (offset, size) in enumerate(spans):
        assert offset % PAGE_BYTES == 0, f"chunk {d} starts mid-page"
        if d:
            assert offset >= ends[d - 1], "chunks overlap"
            assert offset - ends[d - 1] < PAGE_BYTES, "more than the rest of a page between chunks"
            first, last_before = offset // PAGE_BYTES, (ends[d - 1] - 1) // PAGE_BYTES
            assert size == 0 or spans[d - 1][1] == 0 or first > last_before, "a page holds two members' rows"
    assert total % PAGE_BYTES == 0 and total >= max(ends) and total - max(ends) < PAGE_BYTES


# --- placement and oversubscription -----------------------------------------------------------------------

def test_budget_keeps_headroom_for_transients():
    assert managed_plan.budget(30 * GIB, 140 * GIB, headroom=0.1) == 16 * GIB
    assert managed_plan.budget(10 * GIB, 140 * GIB, headroom=0.1) == 0


def test_placement_sends_what_does_not_fit_to_the_host():
    sizes = [3 * MIB, 3 * MIB, 5 * MIB, 1 * MIB, 0]
    gpus = [0, 1, 0, 1, 0]
    # GPU 0 takes 4 MiB of its first chunk's pages, not the 6 MiB of the third; GPU 1 takes both of its own.
    assert managed_plan.place(sizes, gpus, {0: 7 * MIB, 1: 8 * MIB}) == [0, 1, HOST, 1, 0]
    # virtual members of one GPU draw on one budget, in member order
    assert managed_plan.place([2 * MIB] * 3, [0, 0, 0], {0: 5 * MIB}) == [0, 0, HOST]
    assert managed_plan.place([1], [2], {2: 0}) == [HOST]  # a GPU with nothing left hosts nothing
    assert managed_plan.place([4 * MIB], [0], {0: 4 * MIB}) == [0]  # an exact fit stays


def test_placement_reads_free_memory_and_logs_host_placement_once(monkeypatch, caplog):
    monkeypatch.setattr(cuda_storage, "_HOST_PLACED", set())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda gpu: ({0: 20 * GIB, 1: 100 * GIB}[gpu], 100 * GIB))
    with caplog.at_level(logging.WARNING, logger=cuda_storage.__name__):
        assert cuda_storage.placement([8 * GIB, 8 * GIB], [0, 1]) == [0, 1]  # GPU 0: 20 - 10 headroom
        assert cuda_storage.placement([12 * GIB, 12 * GIB], [0, 1]) == [HOST, 1]
        assert cuda_storage.placement([12 * GIB, 12 * GIB], [0, 1]) == [HOST, 1]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cuda:0 is full" in lines[0] and "host memory" in lines[0]


# --- prefetch planning ------------------------------------------------------------------------------------

def test_row_runs():
    runs = managed_plan.row_runs(torch.tensor([9, 5, 1, 2, 2, 7, 8, 3]))
    assert runs.tolist() == [[1, 4], [5, 6], [7, 10]]
    assert managed_plan.row_runs(torch.tensor([], dtype=torch.long)).shape == (0, 2)


def test_prefetch_ranges_are_page_aligned_merged_and_clipped():
    page = 4 * KIB
    runs = torch.tensor([[100, 200], [4000, 4200], [9000, 9001], [30000, 30001], [3000, 3100]])
    ranges = managed_plan.prefetch_ranges(runs, extent=(0, 40000), page=page)
    # [0, 8K) from the first, fifth and second runs (touching pages merge), [8K, 12K), [28K, 32K)
    assert ranges == [(0, 12 * KIB), (28 * KIB, 4 * KIB)]
    for start, size in ranges:
        assert start % page == 0 and size % page == 0 and size > 0
    # reads outside the chunk's pages are dropped or cut at them
    clipped = managed_plan.prefetch_ranges(torch.tensor([[0, 100], [5000, 50000]]), extent=(4 * KIB, 10000), page=page)
    assert clipped == [(4 * KIB, 12 * KIB)]
    assert managed_plan.prefetch_ranges(torch.empty((0, 2), dtype=torch.long), (0, 100), page=page) == []


def test_prefetch_ranges_are_bounded_by_closing_the_smallest_gaps():
    page = 4 * KIB
    pages = [0, 2, 3, 10, 11, 30, 32]  # runs of single pages: gaps 1, 0 (merges), 6, 0, 18, 1
    runs = torch.tensor([[p * page, p * page + 1] for p in pages])
    assert len(managed_plan.prefetch_ranges(runs, (0, 40 * page), page=page)) == 5
    bounded = managed_plan.prefetch_ranges(runs, (0, 40 * page), page=page, max_ranges=3)
    assert bounded == [(0, 4 * page), (10 * page, 2 * page), (30 * page, 3 * page)]  # the 6- and 18-page gaps stay
    assert managed_plan.prefetch_ranges(runs, (0, 40 * page), page=page, max_ranges=1) == [(0, 33 * page)]


def test_rows_to_prefetch_for_a_chunk():
    row_bytes, address = 236, 16 * PAGE_BYTES  # 59 floats; a chunk starting on a page
    rows = 40_000  # 9 MB: five pages
    assert managed_plan.rows_to_prefetch(None, rows, row_bytes, address) == [(address, 5 * PAGE_BYTES)]
    per_page = PAGE_BYTES // row_bytes
    # the last row of the first page straddles into the second; two rows of the fourth page only
    wanted = torch.tensor([per_page, 3 * per_page + 5, 3 * per_page + 6])
    assert managed_plan.rows_to_prefetch(wanted, rows, row_bytes, address) == [
        (address, 2 * PAGE_BYTES), (address + 3 * PAGE_BYTES, PAGE_BYTES)]
    assert managed_plan.rows_to_prefetch(torch.tensor([0, 1]), rows, row_bytes, address) == [(address, PAGE_BYTES)]
    with pytest.raises(AssertionError, match="outside"):
        managed_plan.rows_to_prefetch(torch.tensor([rows]), rows, row_bytes, address)


# --- storage modes and the persistent/transient rule ------------------------------------------------------

@pytest.mark.parametrize("spec", ["cpu", "cpu:2"])
def test_managed_mode_on_cpu_members_is_refused_in_one_line(spec):
    with pytest.raises(StorageModeError) as err:
        members(spec, storage="managed")
    message = str(err.value)
    assert "\n" not in message and "needs GPU members" in message and "--pipeline.model.storage plain" in message
    assert members(spec).storage == "plain"  # the default


def test_storage_modes_pick_the_storage():
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    one = Members("cuda:0", (gpu0,), storage="managed")
    assert one.managed_memory and not one.managed and isinstance(storage_for(even_layout(8, one)), ContiguousStorage)
    virtual = Members("cuda:0*2", (gpu0, gpu0), storage="managed")
    assert virtual.managed_memory and isinstance(storage_for(even_layout(8, virtual)), ContiguousStorage)
    several = Members("cuda:0,1", (gpu0, gpu1), storage="managed")
    assert several.managed and isinstance(storage_for(even_layout(8, several)), ManagedStorage)
    plain = Members("cuda:0,1", (gpu0, gpu1), storage="plain")
    assert not plain.managed_memory and isinstance(storage_for(even_layout(8, plain)), PerMemberStorage)
    assert not members("cpu:2").managed_memory


def test_persistent_rows_stay_persistent_through_views_and_transients_do_not():
    m = members("cpu:3")
    layout = even_layout(10, m)
    x = wrap(layout, *storage_for(layout).empty(layout, (2,), torch.float32, persistent=True))
    x.copy_(torch.arange(20.0).view(10, 2))
    assert is_persistent(x)
    assert is_persistent(torch.nn.Parameter(x))  # nn.Parameter detaches: a view of the same rows
    assert is_persistent(x[:, :1]) and is_persistent(x.view(10, 2))
    assert not is_persistent(x * 2) and not is_persistent(torch.exp(x))
    t = wrap(layout, *storage_for(layout).empty(layout, (2,), torch.float32))
    assert not is_persistent(t)
    with per_member_execution():  # member by member, as on several GPUs
        assert not is_persistent(x + 1) and is_persistent(x.detach())


def test_per_member_storage_marks_every_chunk():
    m = members("cpu:3")
    layout = even_layout(7, m)
    whole, chunks = PerMemberStorage().empty(layout, (3,), torch.float16, persistent=True)
    assert whole is None and [tuple(c.shape) for c in chunks] == [(3, 3), (2, 3), (2, 3)]
    assert is_persistent(wrap(layout, chunks=chunks))
    assert not is_persistent(wrap(layout, chunks=PerMemberStorage().empty(layout, (3,), torch.float16)[1]))


def test_managed_storage_allocates_persistent_rows_per_local_member(monkeypatch):
    """ManagedStorage asks the extension for one striped allocation of the local members' counts and
    leaves transients to the plain per-member storage (checked with CPU stand-ins for the GPUs)."""
    gpus = (torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 2))
    m = Members("cuda:0,1,2", gpus, storage="managed")
    layout = even_layout(10, m)
    calls = []

    def fake_chunks(row_shape, dtype, counts, devices):
        calls.append((tuple(row_shape), dtype, list(counts), list(devices)))
        return [torch.empty((n, *row_shape), dtype=dtype) for n in counts]

    monkeypatch.setattr(cuda_storage, "managed_chunks", fake_chunks)
    monkeypatch.setattr(PerMemberStorage, "empty", lambda self, *a, **k: ("per-member", a, k))
    whole, chunks = ManagedStorage().empty(layout, (4,), torch.float32, persistent=True)
    assert whole is None and calls == [((4,), torch.float32, [4, 3, 3], list(gpus))]
    assert is_persistent(wrap(layout, chunks=chunks))
    assert ManagedStorage().empty(layout, (4,), torch.float32)[0] == "per-member"


def test_prefetch_is_a_no_op_where_rows_are_not_managed():
    m = members("cpu:2")
    x = wrap(even_layout(6, m), *storage_for(even_layout(6, m)).empty(even_layout(6, m), (), torch.float32, persistent=True))
    assert prefetch(x, 0) == [] and prefetch(x, 1, torch.tensor([0, 5])) == []


# --- on a GPU ---------------------------------------------------------------------------------------------

def gpu_specs() -> list:
    return ["cuda:0", "cuda:0*2"] + (["cuda"] if torch.cuda.device_count() > 1 else [])


def persistent(m: Members, rows: int, row_shape=(59,), dtype=torch.float32):
    layout = even_layout(rows, m)
    return wrap(layout, *storage_for(layout).empty(layout, row_shape, dtype, persistent=True))


@needs_gpu
@pytest.mark.parametrize("spec", gpu_specs())
def test_managed_parameters_on_gpus(spec):
    """Persistent rows are managed, each chunk on (and tagged with) its member's GPU and accessible by all
    of them; transients are ordinary caching-allocator memory; Adam steps work; the stats still work."""
    m = members(spec, storage="managed")
    x = persistent(m, 100_000)
    x.copy_(torch.arange(100_000 * 59, dtype=torch.float32).view(100_000, 59))
    torch.cuda.synchronize()
    assert is_persistent(x)
    gpus = sorted({d.index for d in m.devices})
    for d in m.local:
        chunk = x.chunks[d]
        assert chunk.device == m.devices[d] and cuda_storage.is_managed(chunk)
        assert cuda_storage.location(chunk)[0] == m.devices[d].index
        assert sorted(cuda_storage.accessed_by(chunk)) == gpus
        if m.managed:
            assert chunk.data_ptr() % PAGE_BYTES == 0, "striped chunks start on pages"
    assert not any(cuda_storage.is_managed(c) for c in (x * 2).chunks)
    p = torch.nn.Parameter(x)
    opt = torch.optim.Adam([p], lr=0.1)
    (p * p).sum().backward()
    opt.step()
    assert torch.cuda.max_memory_allocated() > 0 and isinstance(torch.cuda.memory_stats(), dict)
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() >= 0


@needs_gpu
def test_memory_statistics_work_after_managed_allocations():
    """nerfstudio calls torch.cuda.max_memory_allocated() at step 0; no allocator replaces torch's."""
    chunks = cuda_storage.managed_chunks((1024,), torch.float32, [600, 400], [0, 0])
    assert all(cuda_storage.is_managed(c) for c in chunks)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = torch.ones(1 << 20, device="cuda:0") * 2
    assert torch.cuda.max_memory_allocated() >= before + 2 * y.nbytes  # the ones and their double
    assert torch.cuda.memory_allocated() >= y.nbytes
    torch.cuda.memory_summary()


@needs_gpu
def test_chunk_views_are_tagged_with_their_member_and_write_through():
    gpus = [0, 1] if torch.cuda.device_count() > 1 else [0, 0]
    a, b = cuda_storage.managed_chunks((3,), torch.int64, [1000, 999], gpus)
    assert (a.device, b.device) == (torch.device("cuda", gpus[0]), torch.device("cuda", gpus[1]))
    assert b.data_ptr() - a.data_ptr() == PAGE_BYTES  # 24 000 bytes of rows, then the next page
    with torch.cuda.device(gpus[1]):
        b.copy_(torch.arange(999 * 3, device=b.device).view(-1, 3))
    a.fill_(7)
    torch.cuda.synchronize()
    assert torch.equal(b.cpu(), torch.arange(999 * 3).view(-1, 3)) and int(a.sum()) == 7 * 3000


@needs_gpu
def test_a_chunk_larger_than_free_memory_lives_on_the_host(monkeypatch, caplog):
    """Oversubscription: with (pretended) no free GPU memory the chunk is preferred on the host, and the
    GPU still reads and writes it over the interconnect."""
    monkeypatch.setattr(cuda_storage, "_HOST_PLACED", set())
    free, total = torch.cuda.mem_get_info(0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda gpu: (0, total))
    with caplog.at_level(logging.WARNING, logger=cuda_storage.__name__):
        (chunk,) = cuda_storage.managed_chunks((1024,), torch.float32, [4096], [0])
    assert cuda_storage.location(chunk)[0] == HOST
    assert sum("host memory" in r.getMessage() for r in caplog.records) == 1
    chunk.fill_(0.5)
    assert float(chunk.sum()) == 0.5 * 4096 * 1024
    assert cuda_storage.prefetch([(chunk, None)], 0) == []  # host rows are not pulled onto a full GPU


@needs_gpu
def test_prefetch_moves_the_pages_read_to_the_member():
    m = members("cuda:0*2" if torch.cuda.device_count() < 2 else "cuda", storage="managed")
    x = persistent(m, 200_000, row_shape=(64,))  # 256 B rows: 8192 rows a page
    reader = m.local[-1]
    ranges = prefetch(x, reader)
    assert ranges and all(a % PAGE_BYTES == 0 and n % PAGE_BYTES == 0 for a, n in ranges)
    rows = torch.tensor([0, 1, 8192 * 3, x.shape[0] - 1])  # rows of every owner
    ranges = prefetch(x, reader, rows)
    assert 1 <= len(ranges) <= 4 and sum(n for _, n in ranges) <= 4 * PAGE_BYTES
    torch.cuda.synchronize()
    last = x.chunks[reader][-8192:]
    assert cuda_storage.location(last)[1] == m.devices[reader].index
