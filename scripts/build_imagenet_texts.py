"""Build the ImageNet-1k class texts for cliplens' offline (ConSE) zero-shot model.

The offline model embeds an image as the probability-weighted mean of sentence
embeddings of its top-k ImageNet class texts.  Bare class names read poorly to a
sentence encoder (a "Pekingese" is not obviously a dog), so each class gets a text
such as "a Pekingese, a kind of dog", where the *kind* is a basic-level WordNet
ancestor of the class.

Run from the repository root (build time only; the TSV is committed):

    python scripts/build_imagenet_texts.py --wordnet /usr/share/wordnet \\
        --out src/cliplens/models/data/imagenet_classes.tsv

Build-time requirements: WordNet 3.0 (``apt-get install wordnet-base``), ``nltk``,
``open_clip_torch`` (readable class names) and ``timm`` (the 1000 wnids in class
order).  Nothing is downloaded; the output is the same on every run.

How the kind is chosen: walk the hypernym graph up from the class synset (at most
``--depth`` steps).  A synset listed in PREFER is taken if present (nearest first):
these are basic-level words that WordNet's SemCor counts under-rate.  Otherwise the
ancestor with the highest usage count (sum of ``Lemma.count()`` over its lemmas,
i.e. cntlist.rev) that is not in STOP wins, ties going to the nearest; if every
candidate has count 0, the direct hypernym is used.  RENAME then replaces jargon
(keyed by the chosen synset, or by the class synset itself for the few classes whose
WordNet sense differs from what ImageNet's photos show).

Debian's wordnet-base lacks the ``lexnames`` file nltk's reader opens (only its man
page, lexnames(5WN), ships).  Its 45 names are fixed since WordNet 1.5, so they are
listed below and served from memory; the reader needs them for the sense keys
``Lemma.count()`` looks up in cntlist.rev.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import sys
import warnings
from pathlib import Path
from typing import IO

import nltk
from nltk.corpus.reader.wordnet import Synset, WordNetCorpusReader

# lexnames(5WN): lexicographer file names, numbered 00..44 in this order.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

# Abstract or over-general ancestors that are never a useful kind.
STOP = frozenset(
    """entity.n.01 physical_entity.n.01 object.n.01 whole.n.02 artifact.n.01
    instrumentality.n.03 device.n.01 organism.n.01 living_thing.n.01 animal.n.01
    vertebrate.n.01 chordate.n.01 placental.n.01 mammal.n.01 invertebrate.n.01
    arthropod.n.01 matter.n.03 substance.n.01 substance.n.07 solid.n.01 fluid.n.01
    abstraction.n.06 part.n.01 relation.n.01 location.n.01 point.n.02 commodity.n.01
    consumer_goods.n.01 covering.n.02 protective_covering.n.01 conveyance.n.03
    container.n.01 system.n.01 causal_agent.n.01 agent.n.03 article.n.02 attribute.n.02
    shape.n.02 natural_object.n.01 material.n.01 establishment.n.04 instrument.n.01
    equipment.n.01 surface.n.01 communication.n.02 food.n.01 food.n.02 nutriment.n.01
    house.n.01""".split()
)

# Basic-level ancestors taken whenever present (SemCor counts them too rarely).
PREFER = frozenset(
    """shark.n.01 turtle.n.02 big_cat.n.01 ape.n.01 dinosaur.n.01 flower.n.01
    helmet.n.01 helmet.n.02 jewelry.n.01 bowl.n.03 towel.n.01 cushion.n.03
    sailing_vessel.n.01 mollusk.n.01 fungus.n.01 electro-acoustic_transducer.n.01
    home_appliance.n.01""".split()
)

# Chosen synset (or class synset) -> readable kind.
RENAME = {
    "acarine.n.01": "arachnid",
    "monotreme.n.01": "mammal",
    "phalanger.n.01": "marsupial",
    "coelenterate.n.01": "sea animal",
    "echinoderm.n.01": "sea animal",
    "decapod_crustacean.n.01": "crustacean",
    "malacostracan_crustacean.n.01": "crustacean",
    "true_lobster.n.01": "lobster",
    "fungus.n.01": "mushroom",
    "plaything.n.01": "toy",
    "sailing_vessel.n.01": "boat",
    "electro-acoustic_transducer.n.01": "audio equipment",
    "brass.n.02": "brass instrument",
    "bowed_stringed_instrument.n.01": "string instrument",
}

# Texts without an article: plural or mass nouns.
NO_ARTICLE = frozenset(
    (
        "jeans", "sunglasses", "pajamas", "tights", "binoculars", "parallel bars",
        "mashed potatoes", "clogs", "swim trunks / shorts", "ice cream", "guacamole", "hay",
        "wool", "toilet paper", "carbonara", "dough", "espresso", "consomme", "red wine",
        "chocolate syrup", "eggnog", "face powder", "lotion", "perfume", "hair spray",
        "sunscreen", "chain mail", "velvet fabric", "corn", "broccoli", "rapeseed",
    )
)


class DebianWordNet(WordNetCorpusReader):
    """nltk's reader over a plain WordNet 3.0 dict directory (e.g. Debian's wordnet-base)."""

    def open(self, file: str) -> IO[str]:
        if file == "lexnames":
            cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
            lines = (f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES))
            return io.StringIO("".join(lines))
        return super().open(file)

    def map_wn(self, version: str = "wordnet") -> None:
        return None  # no Open Multilingual Wordnet mapping (it needs index.sense)


def load_wordnet(root: Path) -> WordNetCorpusReader:
    nltk.data.path.append(str(root))  # nltk >= 3.9 only opens files under its data paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return DebianWordNet(str(root), None)


def readable(s: Synset) -> str:
    return s.lemmas()[0].name().replace("_", " ")


def count(s: Synset) -> int:
    return sum(lemma.count() for lemma in s.lemmas())


def ancestors(s: Synset, depth: int) -> dict[Synset, int]:
    """Hypernyms (and instance hypernyms) up to ``depth`` steps, with their distance."""
    dist: dict[Synset, int] = {}
    frontier = [s]
    for d in range(1, depth + 1):
        nxt = []
        for x in frontier:
            for h in x.hypernyms() + x.instance_hypernyms():
                if h not in dist and h != s:
                    dist[h] = d
                    nxt.append(h)
        frontier = nxt
    return dist


def choose_kind(s: Synset, depth: int) -> str:
    if s.name() in RENAME:
        return RENAME[s.name()]
    dist = ancestors(s, depth)
    order = sorted(dist, key=lambda a: (dist[a], a.name()))
    preferred = [a for a in order if a.name() in PREFER]
    if preferred:
        best = preferred[0]
    else:
        cands = [a for a in order if a.name() not in STOP]
        best = max(cands, key=lambda a: (count(a), -dist[a]), default=None)
        if best is None or count(best) == 0:
            best = parent_of(s)
    return RENAME.get(best.name(), readable(best))


def parent_of(s: Synset) -> Synset:
    return (s.hypernyms() + s.instance_hypernyms())[0]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def with_article(name: str) -> str:
    if name in NO_ARTICLE:
        return name
    low = name.lower()
    vowel = low[0] in "aeiou" and not re.match(r"(uni|eu|use|one)", low)
    if re.match(r"(hour|honest|heir)", low):
        vowel = True
    return f"{'an' if vowel else 'a'} {name}"


def make_text(name: str, kind: str) -> str:
    if words(kind) <= words(name):
        return with_article(name)
    return f"{with_article(name)}, a kind of {kind}"


def default_synsets() -> Path:
    import timm

    return Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"


def build(wn: WordNetCorpusReader, wnids: list[str], names: list[str], depth: int) -> list[list]:
    rows = []
    for index, (wnid, name) in enumerate(zip(wnids, names, strict=True)):
        s = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        kind = choose_kind(s, depth)
        rows.append([index, wnid, name, readable(parent_of(s)), kind, make_text(name, kind)])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--out", type=Path, default=Path("src/cliplens/models/data/imagenet_classes.tsv"))
    p.add_argument("--synsets", type=Path, default=None, help="wnid list (default: timm's)")
    p.add_argument("--depth", type=int, default=6, help="hypernym steps searched for the kind")
    p.add_argument("--top", type=int, default=40, help="kinds shown in the summary")
    args = p.parse_args(argv)

    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = (args.synsets or default_synsets()).read_text().split()
    if len(wnids) != 1000 or len(IMAGENET_CLASSNAMES) != 1000:
        sys.exit("expected 1000 wnids and 1000 class names")
    rows = build(load_wordnet(args.wordnet), wnids, list(IMAGENET_CLASSNAMES), args.depth)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(["index", "wnid", "name", "parent", "kind", "text"])
        w.writerows(rows)

    hist = collections.Counter(row[4] for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}; {len(hist)} kinds")
    for kind, n in hist.most_common(args.top):
        print(f"{n:5d}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
