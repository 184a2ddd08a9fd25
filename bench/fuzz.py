"""Fuzz the shard reader that every reader goes through (``shards.reader``): real shards made by prep, mutated.

    python bench/fuzz.py --minutes 20            # or: make fuzz FUZZ_MINUTES=20
    python bench/fuzz.py --cases 5000 --seed 7   # a fixed number of cases
    python bench/fuzz.py --shards OUT            # the tars of an output of your own (default: prep of data/sample)

Each case starts from the members of a shard prep wrote and applies one to three mutations: structural ones, the tar
rebuilt from the changed member list (a member dropped, duplicated, moved or renamed; names absolute, with ``../``,
folders, extra dots or none; symlink, hard link, device, directory and FIFO members; an extra member; a KEY.json
replaced by JSON that breaks the rule; a huge size declared on a member without data), then byte-level ones on the
tar's bytes (bit flips in headers and payloads, zeroed blocks, a huge size declared in a header with its checksum
fixed, truncation at any member boundary or inside a member). Every case is read from a file through
``reader.read_shard`` with the image hashes checked, and checked for:

- no exception but ``ShardError`` (a shard that cannot be read as a tar), and that only where the mutation can cause
  it (a cut, a huge declared size, damage in the end-of-archive marker);
- no hang: each case runs under a time limit (SIGALRM);
- nothing written: an audit hook sees every open for writing, mkdir, symlink, link, rename and removal while the
  reader runs (the case's own file is written before it is armed);
- the good samples delivered exactly: each sample the mutation left alone (its two members unchanged, consecutive,
  its key nowhere else) is delivered with the same key and bytes, a cut shard's samples up to the cut included; any
  other sample delivered is one the mutation touched and follows the rule (``schema.decode_meta``, its image hash);
  no key twice.

The oracle is independent of the reader: it works from the member list and byte ranges the mutations produce.
A failing case is written to ``--out`` (its bytes and a description) and printed with its seed and index.
``tests/test_fuzz.py`` runs a bounded campaign (a fixed seed) in the suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from shards import layout, reader, schema  # noqa: E402  (needs the path above)

BLOCK = tarfile.BLOCKSIZE
NO_DATA_TYPES = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)


# --- tars from member lists ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tar member to write: ``data`` follows its header unless its type has none; ``size``: a declared size that
    differs from ``len(data)`` (only for types without data, where it is not followed by bytes)."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    size: int | None = None
    linkname: str = ""

    @property
    def has_data(self) -> bool:
        return self.type not in NO_DATA_TYPES


@dataclass(frozen=True)
class Span:
    """Where an entry lies in a tar: its header(s) start at ``start``, its data at ``data``, ending at ``end``
    (``end_padded``: the next block boundary)."""

    entry: Entry
    start: int
    data: int
    end: int
    end_padded: int


def _header(entry: Entry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.type, info.linkname, info.mode = entry.type, entry.linkname, 0o644
    info.size = entry.size if entry.size is not None else len(entry.data)
    fits = len(entry.name.encode("utf-8", "surrogateescape")) <= 100 and info.size < 8**11
    return info.tobuf(tarfile.USTAR_FORMAT if fits else tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def write_tar(entries: Sequence[Entry]) -> tuple[bytes, list[Span], int]:
    """(tar bytes, where each entry lies, offset of the end-of-archive marker): USTAR headers (GNU long names and
    base-256 sizes where USTAR cannot hold them), the two zero blocks, and no record padding."""
    out = bytearray()
    spans = []
    for entry in entries:
        start = len(out)
        out += _header(entry)
        data_at = len(out)
        if entry.has_data:
            out += entry.data + bytes(-len(entry.data) % BLOCK)
        spans.append(Span(entry, start, data_at, data_at + (len(entry.data) if entry.has_data else 0), len(out)))
    marker = len(out)
    out += bytes(2 * BLOCK)
    return bytes(out), spans, marker


def read_entries(data: bytes) -> list[Entry]:
    """The members of a well-formed tar (a shard prep wrote) as entries."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [Entry(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def key_of(name: str) -> str:
    parts = reader.split_name(name)
    return parts[0] if parts else name


# --- the oracle ------------------------------------------------------------------------------------------------------
def runs(entries: Sequence[Entry]) -> list[tuple[str, list[Entry]]]:
    """Maximal runs of consecutive entries sharing a key (the grouping the format prescribes)."""
    out: list[tuple[str, list[Entry]]] = []
    for e in entries:
        k = key_of(e.name)
        if out and out[-1][0] == k:
            out[-1][1].append(e)
        else:
            out.append((k, [e]))
    return out


def untouched(original: Sequence[Entry], changed: Sequence[Entry], good: set[str]) -> set[str]:
    """The good keys a structural change left alone: exactly one run of the key, equal to its original run."""
    before = {k: group for k, group in runs(original)}
    count: dict[str, int] = {}
    for k, _ in runs(changed):
        count[k] = count.get(k, 0) + 1
    return {k for k, group in runs(changed) if k in good and count[k] == 1 and group == before.get(k)}


@dataclass
class Case:
    """A mutated shard and what a correct reader must do with it."""

    data: bytes
    original: dict[str, tuple[bytes, bytes]]  # good key -> (jpg, json) of the shard before the mutation
    must: set[str]  # keys that must be delivered with their original bytes
    may_fail: bool  # whether a ShardError is allowed (a cut, a huge size, the end marker damaged)
    must_fail: bool = False  # whether it is required (a cut before the end of the end-of-archive marker)
    labels: list[str] = field(default_factory=list)


def check_case(case: Case, delivered: list[dict], error: BaseException | None) -> list[str]:
    """What the reader did wrong with ``case`` (empty: nothing)."""
    problems = []
    if error is not None and not (isinstance(error, reader.ShardError) and case.may_fail):
        problems.append(f"raised {type(error).__name__}: {error}")
    if error is None and case.must_fail:
        problems.append("read a cut shard without an error")
    keys = [s["__key__"] for s in delivered]
    if len(set(keys)) != len(keys):
        problems.append(f"delivered a key twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    for s in delivered:
        k = s["__key__"]
        if (s[schema.IMAGE_EXT], s[schema.META_EXT]) == case.original.get(k):
            continue
        if k in case.must:
            problems.append(f"delivered {k!r} with other bytes")
            continue
        try:  # a touched sample may be delivered only if it follows the rule
            meta = schema.decode_meta(s[schema.META_EXT], key=k)
            if meta["image_sha256"] is not None and meta["image_sha256"] != schema.image_sha256(s[schema.IMAGE_EXT]):
                raise ValueError("image hash differs")
        except ValueError as e:
            problems.append(f"delivered {k!r}, which breaks the rule: {e}")
    missing = sorted(case.must - set(keys))
    if missing:
        problems.append(f"lost good samples {missing}")
    return problems


# --- mutations -------------------------------------------------------------------------------------------------------
BAD_JSON = (
    b'{"boxes": [[0, 0, 1e12, 1e12]]}',  # the list, each in a KEY.json that is otherwise valid
    b'{"boxes": [[0.5, 1e308, NaN, 3]]}',
    b'{"boxes": [[-5, 0, 10, 10]]}',
    b'{"boxes": [[5000, 5000, 9000, 9000]]}',
    b'{"boxes": [[4, 4, 4, 10]]}',
    b'{"boxes": [[10, 0, 4, 8]]}',
    b'{"boxes": "many"}',
    b"{broken",
    b"[" * 5000,
    b"",
    b"null",
    b'{"key": 1}',
)


def _json_variant(valid: bytes, rng: random.Random) -> bytes:
    """``valid`` KEY.json bytes with one field broken, or a payload that is not a KEY.json at all."""
    choice = rng.choice(BAD_JSON)
    try:
        meta = json.loads(valid)
    except (ValueError, RecursionError):  # a payload broken by an earlier mutation
        meta = None
    if not choice.startswith(b'{"boxes"') or not isinstance(meta, dict):  # (a payload broken before)
        return choice
    meta["boxes"] = json.loads(choice)["boxes"]
    if rng.random() < 0.2:
        meta["boxes"] = [[0, 0, 1, 1]] * (schema.MAX_BOXES + 1)
    if rng.random() < 0.2:
        meta.pop(rng.choice(["width", "height", "format_version", "image_sha256", "key", "path"]), None)
    return json.dumps(meta).encode()


def _renamed(name: str, other: str, rng: random.Random) -> str:
    key, ext = reader.split_name(name) or (name, "")
    return rng.choice(
        [
            f"{other}.{ext}",
            f"../{name}",
            f"/tmp/{name}",
            f"../../{key}.{ext}",
            f"dir/{name}",
            f"{key}.x.{ext}",
            key,
            f"{key}.txt",
            f"{key}.{ext.upper()}",
            "z" * 120 + f".{ext}",
            f"{key}\udcff.{ext}",
        ]
    )


def structural(entries: list[Entry], rng: random.Random) -> tuple[list[Entry], str]:
    """One structural change of the member list, and its label."""
    out = list(entries)
    i = rng.randrange(len(out))
    j = rng.randrange(len(out) + 1)
    e = out[i]
    kind = rng.choice(["drop", "duplicate", "move", "swap", "rename", "type", "extra", "json", "huge_no_data"])
    if kind == "drop":
        del out[i]
    elif kind == "duplicate":
        out.insert(j, e)
    elif kind == "move":
        del out[i]
        out.insert(min(j, len(out)), e)
    elif kind == "swap":
        j = rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    elif kind == "rename":
        out[i] = dataclasses.replace(e, name=_renamed(e.name, key_of(rng.choice(out).name), rng))
    elif kind == "type":
        out[i] = dataclasses.replace(e, type=rng.choice(NO_DATA_TYPES), linkname=rng.choice(["/etc/passwd", "../x"]))
    elif kind == "extra":
        k = key_of(e.name)
        extra = rng.choice(
            [
                Entry(f"{k}.txt", b"extra"),
                Entry(f"{k}.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                Entry(f"{k}.json", type=tarfile.CHRTYPE),
                Entry(k, type=tarfile.DIRTYPE),
                Entry("../../escape.jpg", b"x"),
                Entry("/etc/cron.d/x.jpg", b"x"),
                Entry("README", b"not a member of a sample"),
            ]
        )
        out.insert(j, extra)
    elif kind == "json":
        jsons = [n for n, x in enumerate(out) if x.name.endswith("." + schema.META_EXT)]
        if jsons:
            i = rng.choice(jsons)
            out[i] = dataclasses.replace(out[i], data=_json_variant(out[i].data, rng))
    else:  # a size far beyond the file on a member that has no data: nothing may be skipped for it
        out[i] = dataclasses.replace(
            e, type=rng.choice(NO_DATA_TYPES), size=rng.choice([8**11 - 1, 1 << 40, 1 << 62]), linkname="x"
        )
    return out, kind


def _touching(spans: Sequence[Span], lo: int, hi: int) -> set[str]:
    """Keys of the entries whose header or data overlaps bytes [lo, hi)."""
    return {key_of(s.entry.name) for s in spans if s.start < hi and lo < s.end_padded}


def byte_level(data: bytes, spans: list[Span], marker: int, rng: random.Random) -> tuple[bytes, set[str], bool, str]:
    """One change of the bytes: (new bytes, keys touched, whether a ShardError may follow, label)."""
    buf = bytearray(data)
    kind = rng.choice(["flip_header", "flip_data", "flip_any", "zero_block", "huge_size"])
    if kind == "flip_header" or (kind in ("flip_data", "huge_size") and not spans):
        s = rng.choice(spans) if spans else None
        at = (s.start if s else marker) + rng.randrange(BLOCK)
    elif kind == "flip_data":
        with_data = [s for s in spans if s.end > s.data] or spans
        s = rng.choice(with_data)
        at = s.data + rng.randrange(max(1, s.end - s.data))
    elif kind == "flip_any":
        at = rng.randrange(len(buf))
    elif kind == "zero_block":
        size = rng.choice([BLOCK, 8 * BLOCK])
        at = rng.randrange(0, len(buf), BLOCK)
        buf[at : at + size] = bytes(len(buf[at : at + size]))
        touched = _touching(spans, at, at + size)
        return bytes(buf), touched, at + size > marker, kind
    else:  # a huge size in a regular member's header, checksum fixed: the reader skips to the end and stops there
        s = rng.choice(spans)
        head = s.data - BLOCK  # the member's own header (after any long-name header)
        size = rng.choice([100 << 20, 8**11 - 1, 1 << 40])  # under the member limit, over it, far over it
        buf[head + 124 : head + 136] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
        buf[head + 148 : head + 156] = b" " * 8
        buf[head + 148 : head + 156] = b"%06o\0 " % tarfile.calc_chksums(bytes(buf[head : head + BLOCK]))[0]
        touched = {key_of(x.entry.name) for x in spans if x.start >= s.start}
        return bytes(buf), touched, True, kind
    buf[at] ^= 1 << rng.randrange(8)
    return bytes(buf), _touching(spans, at, at + 1), at >= marker, kind


def truncated(spans: list[Span], marker: int, at: int) -> tuple[set[str], bool]:
    """(keys a cut at byte ``at`` loses: any with a member whose data ends after it, whether the cut must fail)."""
    lost = {key_of(s.entry.name) for s in spans if s.end > at or s.start >= at}
    return lost, at < marker + 2 * BLOCK


def cut_points(spans: list[Span], marker: int, rng: random.Random) -> list[int]:
    """Every member boundary (header, data start, data end, padded end), the end marker's, and a point inside each
    header and each payload."""
    points = {0, marker, marker + BLOCK, marker + 2 * BLOCK - 1}
    for s in spans:
        points |= {s.start, s.data, s.end, s.end_padded, s.start + rng.randrange(1, BLOCK)}
        if s.end > s.data + 1:
            points.add(rng.randrange(s.data + 1, s.end))
    return sorted(p for p in points if p < marker + 2 * BLOCK)


# --- running cases ---------------------------------------------------------------------------------------------------
class Hang(Exception):
    """A case that ran past its time limit."""


_WRITE_EVENTS = {"os.mkdir", "os.symlink", "os.link", "os.rename", "os.replace", "os.remove", "os.rmdir",
                 "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.copyfile", "shutil.rmtree"}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class WriteWatch:
    """An audit hook (installed once per process) that records writes to the file system while armed."""

    _installed: WriteWatch | None = None

    def __init__(self) -> None:
        self.armed = False
        self.seen: list[str] = []

    @classmethod
    def get(cls) -> WriteWatch:
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if not self.armed:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes:
                self.seen.append(f"open({path!r}, {mode!r})")
        elif event in _WRITE_EVENTS:
            self.seen.append(f"{event}{args!r:.200}")


def read_case(path: str, limit_s: float) -> tuple[list[dict], list[reader.Rejected], BaseException | None, list]:
    """(delivered samples, rejections, the exception or None, writes seen) of reading ``path`` like every reader."""
    delivered: list[dict] = []
    rejected: list[reader.Rejected] = []
    watch = WriteWatch.get()
    error: BaseException | None = None

    def on_alarm(signum, frame):
        raise Hang(f"still reading after {limit_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    watch.seen = []
    watch.armed = True
    try:
        for sample in reader.read_shard(path, on_reject=rejected.append, verify_images=True):
            delivered.append(sample)
    except Exception as e:  # judged by check_case: only ShardError, where allowed
        error = e
    finally:
        watch.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return delivered, rejected, error, list(watch.seen)


@dataclass
class Shard:
    """A clean shard prep wrote, as the mutations start from it."""

    name: str
    entries: list[Entry]
    good: dict[str, tuple[bytes, bytes]]


def load_shards(urls: Sequence[str]) -> list[Shard]:
    out = []
    for url in urls:
        with open(url, "rb") as f:
            entries = read_entries(f.read())
        good = {s["__key__"]: (s[schema.IMAGE_EXT], s[schema.META_EXT]) for s in reader.read_shard(url)}
        if good:
            out.append(Shard(os.path.basename(url), entries, good))
    return out


def make_case(shard: Shard, rng: random.Random, cut: int | None = None) -> Case:
    """One to three mutations of ``shard`` (structural, then byte-level), or only the cut at byte ``cut``."""
    good = set(shard.good)
    entries, labels = list(shard.entries), []
    if cut is None:
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            entries, label = structural(entries, rng)
            labels.append(label)
    must = untouched(shard.entries, entries, good)
    data, spans, marker = write_tar(entries)
    may_fail = must_fail = False
    if cut is None:
        for _ in range(rng.choice([0, 1, 1, 2]) if labels else rng.choice([1, 1, 2])):
            data, touched, fails, label = byte_level(data, spans, marker, rng)
            must -= touched
            may_fail |= fails
            labels.append(label)
        if rng.random() < 0.25:
            cut = rng.choice(cut_points(spans, marker, rng))
    if cut is not None:
        lost, must_fail_cut = truncated(spans, marker, cut)
        data = data[:cut]
        must -= lost
        may_fail = True
        must_fail = must_fail_cut and not labels  # after other damage a cut may also fall in a damaged stretch
        labels.append(f"cut@{cut}")
    return Case(data, shard.good, must, may_fail, must_fail, labels)


@dataclass
class Result:
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)


def run_case(case: Case, path: str, limit_s: float, result: Result, name: str) -> None:
    with open(path, "wb") as f:
        f.write(case.data)
    delivered, rejected, error, writes = read_case(path, limit_s)
    problems = check_case(case, delivered, error)
    if isinstance(error, Hang):
        problems.append(str(error))
    if writes:
        problems.append(f"wrote to the file system: {writes[:3]}")
    for r in rejected:
        result.rejected[r.reason] = result.rejected.get(r.reason, 0) + 1
    result.cases += 1
    if problems:
        kept = f"{path}.fail{len(result.failures)}"
        os.replace(path, kept)
        result.failures.append(f"{name} [{' + '.join(case.labels)}]: {'; '.join(problems)} (bytes in {kept})")


def campaign(
    shards: Sequence[Shard],
    out: str,
    *,
    seed: int = 0,
    seconds: float | None = None,
    cases: int | None = None,
    limit_s: float = 10.0,
    every_cut: bool = True,
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Every cut point of every shard (``every_cut``), then random cases until ``seconds`` or ``cases`` run out."""
    if not shards:
        raise ValueError("no shards with samples to fuzz")
    result = Result()
    start = time.monotonic()
    path = os.path.join(out, "case.tar")
    rng = random.Random(seed)
    read_case(os.devnull, limit_s)  # imports done before the write watch is armed
    for shard in shards if every_cut else ():
        _, spans, marker = write_tar(shard.entries)
        for at in cut_points(spans, marker, rng):
            run_case(make_case(shard, rng, cut=at), path, limit_s, result, f"{shard.name} cut {at}")
    index = 0
    last_report = time.monotonic()
    while (seconds is None or time.monotonic() - start < seconds) and (cases is None or index < cases):
        shard = shards[index % len(shards)]
        case_rng = random.Random(f"{seed}:{index}")
        run_case(make_case(shard, case_rng), path, limit_s, result, f"{shard.name} seed {seed} case {index}")
        index += 1
        if progress is not None and time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            result.seconds = time.monotonic() - start
            progress(result)
    result.seconds = time.monotonic() - start
    return result


def sample_shards(out: str) -> list[str]:
    """Shards prep makes from the bundled COCO sample (8 photos, 4 per shard, stored at 160 px)."""
    from prep import run as prep_run
    from prep.config import PrepConfig

    coco = os.path.join(ROOT, "data", "sample", "coco")
    cfg = PrepConfig(
        kind="coco",
        root=os.path.join(coco, "images"),
        annotations=os.path.join(coco, "annotations", "instances_sample.json"),
        ss_max_side=128,
        max_side=160,
        min_side=32,
        shard_size=4,
    )
    prep_run.run(cfg, out, workers=1, progress=False)
    return [os.path.join(out, n) for n in layout.tars(os.listdir(out))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, help="run random cases for this long (default: 1 minute)")
    p.add_argument("--cases", type=int, help="run this many random cases (instead of --minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random cases (default: 0)")
    p.add_argument("--shards", help="a directory of shards to start from (default: prep of data/sample into --out)")
    p.add_argument("--out", help="work directory: the case file, failing cases (default: a temporary directory)")
    p.add_argument("--limit", type=float, default=10.0, help="seconds a case may take (default: 10)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    seconds = None if args.cases is not None else 60 * (args.minutes if args.minutes is not None else 1.0)
    out = args.out or tempfile.mkdtemp(prefix="fuzz-")
    os.makedirs(out, exist_ok=True)
    if args.shards:
        urls = [os.path.join(args.shards, n) for n in layout.tars(os.listdir(args.shards))]
    else:
        urls = sample_shards(os.path.join(out, "prep"))
    shards = load_shards(urls)
    print(f"fuzz: {len(shards)} shards, {sum(len(s.good) for s in shards)} samples; work directory {out}", flush=True)

    def progress(r: Result) -> None:
        print(f"  {r.cases} cases, {r.seconds / 60:.1f} min, {len(r.failures)} failures", flush=True)

    result = campaign(shards, out, seed=args.seed, seconds=seconds, cases=args.cases, limit_s=args.limit,
                      progress=progress)  # fmt: skip
    for line in result.failures:
        print("FAIL", line)
    figures = {
        "cases": result.cases,
        "minutes": round(result.seconds / 60, 2),
        "cases_per_s": round(result.cases / max(result.seconds, 1e-9), 1),
        "failures": len(result.failures),
        "seed": args.seed,
        "rejected_by_reason": dict(sorted(result.rejected.items())),
    }
    print(
        f"fuzz: {figures['cases']} cases tried in {figures['minutes']} min ({figures['cases_per_s']}/s), "
        f"{figures['failures']} failures; rejections by reason {figures['rejected_by_reason']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, sort_keys=True)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
