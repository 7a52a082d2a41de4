"""Training data: the embedded demo corpus, file loaders, packing into fixed-length rows, sharded batches.

    from glm5.train.data import load_documents, pack_documents, pack_conversations, Batches
    docs = load_documents("corpus.jsonl")                    # or .txt, .parquet, a `datasets.save_to_disk` dir
    rows = pack_documents([tok.encode(d) for d in docs], seq_len=256, eos_id=tok.pad_token_id)
    batches = Batches(rows, batch_size=8, seed=0, rank=0, world_size=1)
    ids, labels = batches.next()                             # this rank's share of the next global batch
    state = batches.state_dict()                             # resumable position: {"position": batches taken}

Rows are `PackedRows(ids [N, T], labels [N, T])`; labels use -100 where no loss is taken (padding, and the
non-assistant tokens of SFT data). The model shifts labels itself: labels[t] is the target of position t-1.
Sharding is deterministic: global batch k is rows perm[k*B : (k+1)*B] of a seeded per-epoch permutation and
rank r takes the r-th contiguous slice, so N ranks see exactly the rows one process would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


@dataclass
class PackedRows:
    ids: torch.Tensor  # [N, T] int64
    labels: torch.Tensor  # [N, T] int64, IGNORE_INDEX where no loss is taken
    # optional [N] int64 group of each row (e.g. 0 = code, 1 = chats): Batches then draws every batch with the
    # same number of rows from each group (stratified), so a step's loss does not swing with the batch's mix
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        data = {"ids": self.ids, "labels": self.labels}
        if self.groups is not None:
            data["groups"] = self.groups
        torch.save(data, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedRows:
        data = torch.load(path, weights_only=True)
        return cls(data["ids"], data["labels"], data.get("groups"))

    def take(self, index) -> PackedRows:
        """The rows at `index` (a slice, list or tensor of row numbers), groups kept."""
        groups = self.groups[index] if self.groups is not None else None
        return PackedRows(self.ids[index], self.labels[index], groups)

    @staticmethod
    def concat(parts: Sequence[PackedRows]) -> PackedRows:
        """The rows of `parts` in order, part i as group i (rows must have one length)."""
        if len({p.seq_len for p in parts}) != 1:
            raise ValueError(f"rows of different lengths cannot be joined: {[p.seq_len for p in parts]}")
        groups = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
        return PackedRows(torch.cat([p.ids for p in parts]), torch.cat([p.labels for p in parts]), groups)


# ---- loading ----------------------------------------------------------------------------------------
def load_records(path: str | os.PathLike) -> list:
    """Records from a file or folder: .txt (one document), .jsonl (one JSON object a line), .parquet
    (pyarrow), or a folder written by `datasets.Dataset.save_to_disk` (needs `datasets`). A folder of
    such files is read in sorted order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file or folder: {path}")
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            try:
                import datasets
            except ImportError as err:
                raise ValueError(f"{path} is a Hugging Face dataset folder; reading it needs `pip install datasets`") from err
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):  # what `load_dataset(...).save_to_disk` writes
                if "train" not in data:
                    raise ValueError(f"{path} holds the splits {list(data)}; pass one split's folder")
                data = data["train"]
            return list(data)
        records = []
        for child in sorted(path.iterdir()):
            if child.suffix in (".txt", ".json", ".jsonl", ".parquet"):
                records.extend(load_records(child))
        return records
    try:
        return _load_file(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _load_file(path: Path) -> list:
    if path.suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        return records
    if path.suffix == ".json":  # one JSON value: a list of records, or one record
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}); JSON Lines files must be named .jsonl") from err
        return data if isinstance(data, list) else [data]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"reading {path} needs `pip install pyarrow`") from err
        return pq.read_table(path).to_pylist()
    return [path.read_text(encoding="utf-8")]


def record_text(record) -> str:
    """The text of a pretraining record: a string, or a dict's "text" (or "content") field."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("text", "content"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"a pretraining record needs a 'text' field, got {str(record)[:80]!r}")


def load_documents(paths: str | os.PathLike | Sequence) -> list[str]:
    """The documents (strings) of one or more data paths; raises ValueError when there are none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs = [record_text(r) for p in paths for r in load_records(p)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"empty dataset: no text in {', '.join(map(str, paths))}")
    return docs


def load_conversations(paths: str | os.PathLike | Sequence) -> list[dict]:
    """Chat records ({"messages": [...], "tools": [...]?}) of one or more paths; ValueError when there are none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    convs = []
    for p in paths:
        for record in load_records(p):
            if not (isinstance(record, dict) and isinstance(record.get("messages"), list)):
                raise ValueError(f"{p}: an SFT record needs a 'messages' list, got {str(record)[:80]!r}")
            convs.append(record)
    if not convs:
        raise ValueError(f"empty dataset: no conversations in {', '.join(map(str, paths))}")
    return convs


# ---- packing ----------------------------------------------------------------------------------------
def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int) -> PackedRows:
    """Concatenate documents, each followed by `eos_id`, and cut the stream into rows of seq_len tokens
    (the tail that does not fill a row is dropped). Every token is a target."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ValueError(f"empty dataset: {len(stream)} tokens do not fill one row of {seq_len}")
    ids = torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)
    return PackedRows(ids, ids.clone())


@dataclass
class PackStats:
    """What pack_conversations did with its conversations: how many it read, how many were longer than a row,
    and of those how many it cut to the row's length (truncate=True) or left out whole (the default); and how
    many it left out because no assistant token was left to learn from."""

    conversations: int = 0
    longer: int = 0
    truncated: int = 0
    dropped_longer: int = 0
    dropped_no_target: int = 0
    seq_len: int = 0

    @property
    def kept(self) -> int:
        return self.conversations - self.dropped_longer - self.dropped_no_target

    def describe(self) -> str:
        """One line: "5 conversations, 1 kept; 4 longer than 512 tokens: 4 dropped (--truncate cuts them instead)"."""
        line = f"{self.conversations} conversations, {self.kept} kept"
        if self.longer:
            line += f"; {self.longer} longer than {self.seq_len} tokens: "
            line += (f"{self.truncated} cut to {self.seq_len}" if self.truncated
                     else f"{self.dropped_longer} dropped (--truncate cuts them instead)")
        if self.dropped_no_target:
            line += f"; {self.dropped_no_target} dropped with no assistant token" + (" left after the cut" if self.truncated else "")
        return line


def pack_conversations(samples: Iterable[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                       truncate: bool = False, stats: PackStats | None = None) -> PackedRows:
    """Pack (ids, target mask) samples whole into rows of seq_len (first fit in order, no sample split);
    labels are the ids where the mask is set, IGNORE_INDEX elsewhere and on padding.
    A sample longer than seq_len is left out, or with truncate=True cut to its first seq_len tokens; a sample
    with no target left is left out. `stats` (a PackStats), when given, is filled with the counts."""
    stats = stats if stats is not None else PackStats()
    stats.seq_len = seq_len
    rows: list[tuple[list[int], list[int]]] = []
    current_ids: list[int] = []
    current_labels: list[int] = []
    for ids, mask in samples:
        stats.conversations += 1
        if len(ids) > seq_len:
            stats.longer += 1
            if not truncate:
                stats.dropped_longer += 1
                continue
            stats.truncated += 1
        ids, mask = list(ids)[:seq_len], list(mask)[:seq_len]
        if not any(mask):  # nothing to learn (e.g. a cut that kept only the prompt): it would only pad a row
            stats.dropped_no_target += 1
            continue
        if len(current_ids) + len(ids) > seq_len:
            rows.append((current_ids, current_labels))
            current_ids, current_labels = [], []
        current_ids.extend(ids)
        current_labels.extend(i if m else IGNORE_INDEX for i, m in zip(ids, mask))
    if current_ids:
        rows.append((current_ids, current_labels))
    if not rows:
        raise ValueError(f"empty dataset: no conversation has an assistant token to learn ({stats.describe()})")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for n, (row_ids, row_labels) in enumerate(rows):
        ids[n, : len(row_ids)] = torch.tensor(row_ids)
        labels[n, : len(row_labels)] = torch.tensor(row_labels)
    return PackedRows(ids, labels)


# ---- batches ----------------------------------------------------------------------------------------
def stratified_counts(sizes: Sequence[int], batch_size: int) -> list[int]:
    """Rows per batch from each group, in proportion to the groups' sizes (largest remainder), at least one
    from every non-empty group."""
    total = sum(sizes)
    if batch_size < sum(1 for n in sizes if n):
        raise ValueError(f"batch size {batch_size} is smaller than the {len(sizes)} row groups it must mix")
    exact = [batch_size * n / total for n in sizes]
    counts = [max(1, int(x)) if n else 0 for x, n in zip(exact, sizes)]
    while sum(counts) > batch_size:  # the minimum of one took rows from the others
        i = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    while sum(counts) < batch_size:
        i = max(range(len(counts)), key=lambda j: (exact[j] - counts[j]) if sizes[j] else -1e9)
        counts[i] += 1
    return counts


class Batches:
    """An endless, deterministic, resumable stream of global batches; each rank gets its slice.

    `batch_size` is the global number of rows per call of `next()`; it must divide by world_size.
    The permutation of epoch e comes from seed + e, so the stream depends only on (rows, seed).
    Rows with `groups` are stratified: global batch k holds `counts[g]` rows of each group g (in proportion to
    the group sizes, see stratified_counts), the next ones of that group's own seeded per-epoch permutation.
    """

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(rows) == 0:
            raise ValueError("empty dataset: no rows to batch")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global batches handed out so far
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # group -> (epoch, permutation)
        if rows.groups is None:
            self.members = [torch.arange(len(rows))]
        else:
            self.members = [torch.nonzero(rows.groups == g).flatten() for g in range(int(rows.groups.max()) + 1)]
        self.counts = stratified_counts([len(m) for m in self.members], batch_size)

    def _row(self, group: int, stream_index: int) -> int:
        members = self.members[group]
        epoch, offset = divmod(stream_index, len(members))
        if self._perms.get(group, (None,))[0] != epoch:
            # group 0's permutation is the unstratified one (seed + epoch), so rows without groups are unchanged
            gen = torch.Generator().manual_seed(self.seed + epoch + 1_000_003 * group)
            self._perms[group] = (epoch, torch.randperm(len(members), generator=gen))
        return int(members[self._perms[group][1][offset]])

    def global_indices(self, position: int) -> list[int]:
        """Row indices of global batch `position` (all ranks)."""
        return [self._row(g, position * count + i) for g, count in enumerate(self.counts) for i in range(count)]

    def indices(self, position: int) -> list[int]:
        """Row indices of this rank's slice of global batch `position`."""
        per_rank = self.batch_size // self.world_size
        return self.global_indices(position)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(self.indices(self.position))
        self.position += 1
        return self.rows.ids[index], self.rows.labels[index]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rows": len(self.rows), "batch_size": self.batch_size,
                "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rows", "batch_size", "counts"):
            if state.get(key, mine["counts"] if key == "counts" else None) != mine[key]:
                raise ValueError(f"the checkpoint's data position is for {key}={state.get(key)}, this run has {mine[key]}")
        self.position = int(state["position"])
