"""Build the ImageNet-1k class texts for cliplens' offline (ConSE) zero-shot model.

The offline model embeds an image as the probability-weighted mean of sentence embeddings
of its top-k ImageNet class texts.  Bare class names read poorly to a sentence encoder (a
"Pekingese" is not obviously a dog), so each class gets a text such as "a Pekingese, a kind
of dog", where the *kind* is a basic-level WordNet ancestor.  Run from the repository root
(build time only; the TSV is committed), and the output is the same on every run:

    python scripts/build_imagenet_texts.py --wordnet /usr/share/wordnet \\
        --out src/cliplens/models/data/imagenet_classes.tsv

Needs, at build time only: WordNet 3.0 (``apt-get install wordnet-base``), ``nltk``,
``open_clip_torch`` (readable class names) and ``timm`` (the wnids in class order).

The kind: CLASS_KIND if the class is listed there; else the nearest PREFER synset within
``--depth`` hypernym steps (basic-level words that SemCor counts under-rate); else, of the
ancestors within ``--depth`` steps not in STOP, the one with the highest usage count (sum
of ``Lemma.count()``, i.e. cntlist.rev), ties to the nearest; if all counts are 0, the
nearest FALLBACK ancestor, else the direct hypernym.  RENAME then replaces jargon.

Debian's wordnet-base lacks the ``lexnames`` file nltk's reader opens (only its man page,
lexnames(5WN), ships); its 45 names, fixed since WordNet 1.5, are listed below and served
from memory (``Lemma.count()`` needs them to build sense keys).
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import sys
import warnings
from pathlib import Path
from typing import IO

import nltk
from nltk.corpus.reader.wordnet import Synset, WordNetCorpusReader


def _set(text: str, sep: str | None = None) -> frozenset[str]:
    return frozenset(t.strip() for t in text.split(sep))


def _map(text: str) -> dict[str, str]:
    """``"a.n.01: kind, b.n.02: other kind"`` -> ``{"a.n.01": "kind", ...}``."""
    pairs = (item.split(":") for item in text.split(","))
    return {key.strip(): value.strip() for key, value in pairs}


# lexnames(5WN): the lexicographer file names, numbered 00..44 in this order.
LEXNAMES = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact
    noun.attribute noun.body noun.cognition noun.communication noun.event noun.feeling
    noun.food noun.group noun.location noun.motive noun.object noun.person noun.phenomenon
    noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state
    noun.substance noun.time verb.body verb.change verb.cognition verb.communication
    verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion
    verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"""

# Abstract or over-general ancestors that are never a useful kind.
STOP = _set("""entity.n.01 physical_entity.n.01 object.n.01 whole.n.02 artifact.n.01
    instrumentality.n.03 device.n.01 organism.n.01 living_thing.n.01 animal.n.01
    vertebrate.n.01 chordate.n.01 placental.n.01 mammal.n.01 invertebrate.n.01
    arthropod.n.01 matter.n.03 substance.n.01 substance.n.07 solid.n.01 fluid.n.01
    liquid.n.01 abstraction.n.06 part.n.01 relation.n.01 location.n.01 point.n.02
    commodity.n.01 consumer_goods.n.01 covering.n.02 protective_covering.n.01
    conveyance.n.03 container.n.01 system.n.01 causal_agent.n.01 agent.n.03 article.n.02
    attribute.n.02 shape.n.02 natural_object.n.01 material.n.01 establishment.n.04
    instrument.n.01 equipment.n.01 surface.n.01 communication.n.02 food.n.01 food.n.02
    nutriment.n.01 drug.n.01 house.n.01""")

# When every candidate has count 0: the nearest of these (at any depth), else the parent.
FALLBACK = ("mammal.n.01",)

# Basic-level ancestors taken whenever present (SemCor counts them too rarely).
PREFER = _set("""shark.n.01 turtle.n.02 big_cat.n.01 ape.n.01 dinosaur.n.01 mollusk.n.01
    rodent.n.01 swine.n.01 camel.n.01 lemur.n.01 marsupial.n.01 whale.n.02 seal.n.09
    sloth.n.02 fungus.n.01 flower.n.01 building.n.01 computer.n.01 home_appliance.n.01
    electro-acoustic_transducer.n.01 sailing_vessel.n.01 helmet.n.01 helmet.n.02
    jewelry.n.01 bowl.n.03 towel.n.01 cushion.n.03 piece_of_cloth.n.01""")

# Chosen synset -> readable kind (jargon or misleading lemmas).
RENAME = _map("""acarine.n.01: arachnid, coelenterate.n.01: sea animal,
    anthozoan.n.01: sea animal, echinoderm.n.01: sea animal, stony_coral.n.01: coral,
    decapod_crustacean.n.01: crustacean, malacostracan_crustacean.n.01: crustacean,
    true_lobster.n.01: lobster, fungus.n.01: mushroom, piece_of_cloth.n.01: cloth,
    plaything.n.01: toy, sailing_vessel.n.01: boat, brass.n.02: brass instrument,
    electro-acoustic_transducer.n.01: audio equipment, astronomical_telescope.n.01: telescope,
    bowed_stringed_instrument.n.01: string instrument, loaf_of_bread.n.01: bread,
    geological_formation.n.01: landform, natural_depression.n.01: landform""")

# Class synset -> kind, where ImageNet's photos differ from the WordNet sense or its
# hypernyms mislead (WordNet files "menu" under food, "Dutch oven" under ovens, ...).
CLASS_KIND = _map("""tusker.n.01: elephant, bell_cote.n.01: tower, binder.n.03: office supply,
    breastplate.n.01: armor, cloak.n.01: clothing, coffeepot.n.01: home appliance,
    dutch_oven.n.01: pot, face_powder.n.01: makeup, flagpole.n.02: pole,
    grocery_store.n.01: shop, home_theater.n.01: electronic equipment, ipod.n.01: music player,
    loupe.n.01: magnifier, lumbermill.n.01: factory, manhole_cover.n.01: cover,
    maze.n.01: puzzle, measuring_cup.n.01: cup, nipple.n.02: pacifier, pier.n.03: structure,
    piggy_bank.n.01: money box, punching_bag.n.02: sports equipment, ski.n.01: sports equipment,
    radio.n.03: electronic device, television.n.02: electronic device, seat_belt.n.01: belt,
    space_bar.n.01: key, spider_web.n.01: web, table_lamp.n.01: lamp, web_site.n.01: website,
    comic_book.n.01: publication, menu.n.02: document, plate.n.08: meal, cup.n.06: cup,
    mashed_potato.n.01: dish, meat_loaf.n.01: dish, dough.n.01: food, bubble.n.01: bubble,
    coral_reef.n.01: reef, rapeseed.n.01: crop, corn.n.02: grain, ear.n.05: vegetable,
    reel.n.03: fishing gear, rain_barrel.n.01: barrel, book_jacket.n.01: book cover,
    moped.n.01: motorcycle, motor_scooter.n.01: motorcycle""")

# Texts without an article: plural or mass nouns.
NO_ARTICLE = _set(
    """jeans| sunglasses| pajamas| tights| binoculars| parallel bars| mashed potatoes| clogs|
    swim trunks / shorts| ice cream| guacamole| hay| wool| toilet paper| carbonara| dough|
    espresso| consomme| red wine| chocolate syrup| eggnog| face powder| lotion| perfume|
    hair spray| sunscreen| chain mail| velvet fabric| corn| broccoli| rapeseed""",
    sep="|",
)


class DebianWordNet(WordNetCorpusReader):
    """nltk's reader over a plain WordNet 3.0 dict directory (e.g. Debian's wordnet-base)."""

    def open(self, file: str) -> IO[str]:
        if file == "lexnames":
            cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
            names = LEXNAMES.split()
            lines = (f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n" for i, n in enumerate(names))
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


def ancestors(s: Synset) -> dict[Synset, int]:
    """All hypernyms (and instance hypernyms) of ``s``, with their distance from it."""
    dist: dict[Synset, int] = {}
    frontier, d = [s], 0
    while frontier:
        d += 1
        nxt = []
        for x in frontier:
            for h in x.hypernyms() + x.instance_hypernyms():
                if h not in dist:
                    dist[h] = d
                    nxt.append(h)
        frontier = nxt
    return dist


def choose_kind(s: Synset, depth: int) -> str:
    if s.name() in CLASS_KIND:
        return CLASS_KIND[s.name()]
    dist = ancestors(s)
    order = sorted(dist, key=lambda a: (dist[a], a.name()))
    near = [a for a in order if dist[a] <= depth]
    preferred = [a for a in near if a.name() in PREFER]
    if preferred:
        best = preferred[0]
    else:
        cands = [a for a in near if a.name() not in STOP]
        best = max(cands, key=lambda a: (count(a), -dist[a]), default=None)
        if best is None or count(best) == 0:
            fallback = [a for a in order if a.name() in FALLBACK]
            best = fallback[0] if fallback else parent_of(s)
    return RENAME.get(best.name(), readable(best))


def parent_of(s: Synset) -> Synset:
    """The direct hypernym; of several, the most used (nltk keeps them in a set)."""
    return min(s.hypernyms() + s.instance_hypernyms(), key=lambda h: (-count(h), h.name()))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def with_article(name: str) -> str:
    if name in NO_ARTICLE:
        return name
    an = re.match(r"(?!uni|eu|use|one)[aeiou]|hour|honest|heir", name.lower())
    return f"{'an' if an else 'a'} {name}"


def make_text(name: str, kind: str) -> str:
    if words(kind) <= words(name):
        return with_article(name)
    return f"{with_article(name)}, a kind of {kind}"


def build(wn: WordNetCorpusReader, wnids: list[str], names: list[str], depth: int) -> list[list]:
    for key in (*STOP, *FALLBACK, *PREFER, *RENAME, *CLASS_KIND):
        wn.synset(key)  # a typo in the tables raises WordNetError here
    synsets = [wn.synset_from_pos_and_offset("n", int(wnid[1:])) for wnid in wnids]
    if stray := set(CLASS_KIND) - {s.name() for s in synsets}:
        raise ValueError(f"CLASS_KIND names synsets that are no ImageNet class: {stray}")
    rows = []
    for index, (wnid, name, s) in enumerate(zip(wnids, names, synsets, strict=True)):
        kind = choose_kind(s, depth)
        rows.append([index, wnid, name, readable(parent_of(s)), kind, make_text(name, kind)])
    return rows


OUT = Path("src/cliplens/models/data/imagenet_classes.tsv")
HEADER = ["index", "wnid", "name", "parent", "kind", "text"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--synsets", type=Path, default=None, help="wnid list (default: timm's)")
    p.add_argument("--depth", type=int, default=6, help="hypernym steps searched for the kind")
    p.add_argument("--top", type=int, default=40, help="kinds shown in the summary")
    args = p.parse_args(argv)

    import timm
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    timm_synsets = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    wnids = (args.synsets or timm_synsets).read_text().split()
    if len(wnids) != 1000 or len(IMAGENET_CLASSNAMES) != 1000:
        sys.exit("expected 1000 wnids and 1000 class names")
    rows = build(load_wordnet(args.wordnet), wnids, list(IMAGENET_CLASSNAMES), args.depth)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(map(str, row)) for row in [HEADER, *rows]]
    assert all(line.count("\t") == len(HEADER) - 1 for line in lines), "tab in a field"
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")

    hist = collections.Counter(row[4] for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}; {len(hist)} kinds")
    for kind, n in hist.most_common(args.top):
        print(f"{n:5d}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
