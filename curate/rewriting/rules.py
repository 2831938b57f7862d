"""The offline `rules` backend: a deterministic word-level paraphrase. A weak fallback.

This is NOT a language model and does not rewrite like one. It swaps words and short phrases for
synonyms from a small hand-written table (about 200 common caption words; colours, numbers and
names are left alone), swaps a leading "a photo of" for "an image of" and the like, and, when a
caption has no word in the table, wraps it in a neutral frame ("an image of ...",
"..., in a picture"). It exists so the rewrite stage can run, and be tested, without an LLM
endpoint; rewrites it makes add little diversity compared with LaCLIP's LLM rewrites.

Guarantees, for a non-empty caption: the result is one line, differs from the caption (as
`validate.check_rewrite` compares them), depends only on (caption, uid, index, seed), and for
indexes below `DISTINCT_INDEXES` differs from the results for smaller indexes whenever the table
offers enough variants. When the caption has at most ``MAX_CLIP_TOKENS - FRAME_MARGIN`` CLIP
tokens the result has at most `MAX_CLIP_TOKENS`; a caption already over the limit gets
substitutions only (CLIP truncates it anyway). Words are only replaced when lower case (or
capitalised at the start of a sentence and not followed by another capitalised word), so names
such as "New York" or "Big Ben" keep their words; "a"/"an" before a replaced word is adjusted.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from curate.rewriting.prompts import one_line
from curate.rewriting.validate import MAX_CLIP_TOKENS, clip_token_count, comparable

__all__ = ["DISTINCT_INDEXES", "FRAME_MARGIN", "RULES_VERSION", "SYNONYMS", "rules_rewrite"]

# Word or phrase (lower case) -> replacements that keep its meaning in typical captions.
# Words with a common second sense that would make nonsense ("shows", "drink", "plate",
# "building" as a verb) are left out on purpose.
SYNONYMS: dict[str, tuple[str, ...]] = {
    # pictures and views
    "photo": ("picture", "image", "shot", "snapshot"),
    "photos": ("pictures", "images", "shots"),
    "photograph": ("photo", "picture", "image"),
    "photographs": ("photos", "pictures", "images"),
    "picture": ("photo", "image"),
    "pictures": ("photos", "images"),
    "image": ("picture",),
    "images": ("pictures",),
    "pic": ("photo", "picture"),
    "view": ("scene",),
    "scene": ("view", "setting"),
    "landscape": ("scenery", "vista"),
    "scenery": ("landscape",),
    "close-up": ("close shot", "detail shot"),
    "closeup": ("close shot", "detail shot"),
    "screenshot": ("screen capture", "screengrab"),
    "skyline": ("cityscape",),
    "illustration": ("artwork", "drawing"),
    "artwork": ("art piece", "piece of art"),
    "logo": ("emblem", "insignia"),
    "icon": ("symbol",),
    "background": ("backdrop", "setting"),
    "statue": ("sculpture",),
    # people
    "man": ("guy", "gentleman"),
    "men": ("guys", "gentlemen"),
    "woman": ("lady",),
    "women": ("ladies",),
    "lady": ("woman",),
    "ladies": ("women",),
    "gentleman": ("man",),
    "guy": ("man", "fellow"),
    "person": ("individual",),
    "people": ("individuals", "folks"),
    "child": ("kid", "youngster"),
    "children": ("kids", "youngsters"),
    "kid": ("child", "youngster"),
    "kids": ("children", "youngsters"),
    "boy": ("lad",),
    "baby": ("infant",),
    "babies": ("infants",),
    "teen": ("teenager", "adolescent"),
    "teenager": ("teen", "adolescent"),
    "teenagers": ("teens", "adolescents"),
    "friend": ("pal", "buddy"),
    "friends": ("pals", "buddies"),
    "couple": ("pair",),
    "student": ("pupil",),
    "students": ("pupils",),
    "teacher": ("instructor", "educator"),
    "doctor": ("physician",),
    "chef": ("cook",),
    "athlete": ("sportsperson",),
    "audience": ("spectators", "onlookers"),
    "crowd": ("throng", "mass of people"),
    "team": ("squad",),
    # animals
    "dog": ("canine", "pooch"),
    "dogs": ("canines", "pooches"),
    "puppy": ("pup", "young dog"),
    "puppies": ("pups", "young dogs"),
    "cat": ("kitty", "feline"),
    "cats": ("kitties", "felines"),
    "kitten": ("kitty", "young cat"),
    "kittens": ("kitties", "young cats"),
    "animal": ("creature",),
    "animals": ("creatures",),
    "insect": ("bug",),
    "bug": ("insect",),
    # things and vehicles
    "car": ("automobile", "vehicle"),
    "cars": ("automobiles", "vehicles"),
    "truck": ("lorry",),
    "bike": ("bicycle", "cycle"),
    "bicycle": ("bike", "cycle"),
    "motorcycle": ("motorbike",),
    "boat": ("vessel", "watercraft"),
    "ship": ("vessel",),
    "airplane": ("plane", "aircraft"),
    "plane": ("airplane", "aircraft"),
    "phone": ("telephone",),
    "laptop": ("notebook computer",),
    "computer": ("pc",),
    "television": ("tv",),
    "tv": ("television",),
    "couch": ("sofa", "settee"),
    "sofa": ("couch", "settee"),
    "chair": ("seat",),
    "pillow": ("cushion",),
    "pillows": ("cushions",),
    "carpet": ("rug",),
    "rug": ("carpet",),
    "curtains": ("drapes",),
    "cabinet": ("cupboard",),
    "closet": ("wardrobe",),
    "clock": ("timepiece",),
    "stairs": ("steps", "staircase"),
    "staircase": ("stairway", "stairs"),
    "gift": ("present",),
    "gifts": ("presents",),
    "toy": ("plaything",),
    "toys": ("playthings",),
    "decoration": ("ornament", "decor"),
    "decorations": ("ornaments",),
    "pattern": ("motif", "design"),
    "backpack": ("rucksack", "knapsack"),
    "purse": ("handbag",),
    "handbag": ("purse",),
    "books": ("volumes",),
    # clothes and food
    "shirt": ("top",),
    "t-shirt": ("tee", "tee shirt"),
    "jacket": ("coat",),
    "coat": ("jacket",),
    "pants": ("trousers",),
    "sneakers": ("trainers", "running shoes"),
    "shoes": ("footwear",),
    "dress": ("gown", "frock"),
    "outfit": ("ensemble", "attire"),
    "meal": ("dish",),
    "beverage": ("drink",),
    "dessert": ("sweet", "treat"),
    "snack": ("treat",),
    "vegetables": ("veggies",),
    # places and nature
    "house": ("home", "residence"),
    "buildings": ("structures",),
    "road": ("street", "roadway"),
    "street": ("road",),
    "highway": ("freeway", "motorway"),
    "sidewalk": ("pavement", "footpath"),
    "path": ("trail", "pathway"),
    "pathway": ("path", "walkway"),
    "trail": ("path", "track"),
    "sea": ("ocean",),
    "ocean": ("sea",),
    "beach": ("shore", "seaside"),
    "shore": ("coast", "beach"),
    "coast": ("shoreline", "coastline"),
    "shoreline": ("coastline",),
    "waves": ("breakers", "surf"),
    "island": ("isle",),
    "river": ("waterway",),
    "waterfall": ("falls", "cascade"),
    "hill": ("slope", "hillside"),
    "mountain": ("peak", "mount"),
    "mountains": ("peaks",),
    "forest": ("woodland",),
    "woods": ("forest", "woodland"),
    "meadow": ("field", "grassland"),
    "lawn": ("grass",),
    "stone": ("rock",),
    "stones": ("rocks",),
    "sunset": ("sundown",),
    "sunrise": ("dawn", "daybreak"),
    "storm": ("tempest",),
    "rain": ("rainfall",),
    "shop": ("store", "boutique"),
    "store": ("shop",),
    "restaurant": ("eatery", "diner"),
    "market": ("marketplace", "bazaar"),
    "office": ("workplace",),
    "classroom": ("schoolroom",),
    "bathroom": ("washroom",),
    "backyard": ("back garden", "yard"),
    "playground": ("play area",),
    "area": ("zone", "region"),
    "spot": ("place", "location"),
    "place": ("spot", "location"),
    "living room": ("lounge", "sitting room"),
    # events
    "party": ("celebration", "gathering"),
    "meeting": ("gathering",),
    "concert": ("live show", "gig"),
    "trip": ("journey", "outing"),
    "vacation": ("holiday", "getaway"),
    # adjectives (colours are left alone)
    "big": ("large", "sizable"),
    "large": ("big", "sizable"),
    "huge": ("enormous", "massive"),
    "enormous": ("huge", "massive"),
    "massive": ("huge", "enormous"),
    "giant": ("huge", "enormous"),
    "small": ("little",),
    "little": ("small",),
    "tiny": ("very small", "minuscule"),
    "beautiful": ("lovely", "gorgeous", "pretty"),
    "lovely": ("beautiful", "charming"),
    "gorgeous": ("stunning", "beautiful"),
    "stunning": ("striking", "gorgeous"),
    "charming": ("delightful",),
    "cute": ("adorable", "sweet"),
    "adorable": ("cute", "sweet"),
    "happy": ("cheerful", "joyful"),
    "sad": ("unhappy", "sorrowful"),
    "old": ("aged",),
    "elderly": ("older", "aged"),
    "young": ("youthful",),
    "modern": ("contemporary",),
    "vintage": ("retro", "classic"),
    "ancient": ("age-old",),
    "colorful": ("vibrant", "multicolored"),
    "colourful": ("vibrant", "multicoloured"),
    "bright": ("vivid",),
    "dark": ("dim", "shadowy"),
    "empty": ("vacant", "deserted"),
    "quiet": ("calm", "peaceful"),
    "calm": ("tranquil", "serene"),
    "peaceful": ("tranquil", "serene", "calm"),
    "busy": ("bustling",),
    "crowded": ("packed",),
    "clean": ("spotless", "tidy"),
    "dirty": ("grimy", "soiled"),
    "delicious": ("tasty", "scrumptious"),
    "tasty": ("delicious", "flavorful"),
    "homemade": ("made at home",),
    "simple": ("plain", "basic"),
    "elegant": ("stylish", "graceful"),
    "famous": ("well-known", "renowned"),
    "popular": ("well-liked",),
    "amazing": ("incredible", "wonderful"),
    "awesome": ("amazing", "impressive"),
    "wonderful": ("marvelous", "amazing"),
    "nice": ("pleasant", "lovely"),
    "funny": ("amusing", "humorous"),
    "scary": ("frightening", "spooky"),
    "cozy": ("snug", "comfy"),
    "sunny": ("sunlit",),
    "cloudy": ("overcast",),
    "foggy": ("misty", "hazy"),
    "snowy": ("snow-covered",),
    "rocky": ("stony",),
    "wooden": ("wood", "timber"),
    "wide": ("broad",),
    "round": ("circular",),
    "fluffy": ("furry",),
    "shiny": ("glossy", "gleaming"),
    "abandoned": ("deserted", "derelict"),
    "picturesque": ("scenic",),
    "scenic": ("picturesque",),
    "luxury": ("upscale", "high-end"),
    "luxurious": ("lavish", "opulent"),
    "cheap": ("inexpensive",),
    "expensive": ("costly", "pricey"),
    "tired": ("weary",),
    "various": ("assorted",),
    "many": ("numerous",),
    "several": ("multiple",),
    "very": ("really",),
    # verbs
    "sitting": ("seated",),
    "sits": ("rests",),
    "holding": ("carrying", "gripping"),
    "holds": ("carries", "grips"),
    "wearing": ("dressed in", "sporting"),
    "wears": ("sports",),
    "eating": ("consuming",),
    "drinking": ("sipping",),
    "lying": ("resting", "lounging"),
    "resting": ("relaxing", "lounging"),
    "relaxing": ("unwinding", "resting"),
    "sleeping": ("napping", "dozing"),
    "smiling": ("grinning", "beaming"),
    "laughing": ("chuckling", "giggling"),
    "talking": ("chatting", "speaking"),
    "jumping": ("leaping",),
    "posing": ("striking a pose",),
    "showing": ("depicting", "displaying"),
    "featuring": ("showing", "with"),
    "shown": ("pictured", "depicted"),
    "pictured": ("shown",),
    "depicted": ("shown", "portrayed"),
    "taken": ("captured",),
    "covered": ("coated",),
    "decorated": ("adorned", "embellished"),
    "surrounded": ("encircled",),
    "located": ("situated",),
    "situated": ("located",),
    "built": ("constructed",),
    "displayed": ("exhibited", "shown"),
    "lit": ("illuminated",),
    "illuminated": ("lit up", "lit"),
    "glowing": ("shining", "radiant"),
    "shining": ("gleaming", "glowing"),
    "enjoying": ("savoring", "relishing"),
    "gathered": ("assembled",),
    # places in relation
    "near": ("close to", "by"),
    "beside": ("next to", "alongside"),
    "under": ("beneath", "below"),
    "underneath": ("beneath", "under"),
    "below": ("beneath", "under"),
    "above": ("over",),
    "inside": ("within",),
    "among": ("amid", "amongst"),
    "along": ("alongside",),
    "towards": ("toward",),
    "toward": ("towards",),
    "atop": ("on top of",),
    "outdoors": ("outside", "in the open air"),
    "indoors": ("inside",),
    # phrases
    "next to": ("beside", "alongside"),
    "on top of": ("atop",),
    "close to": ("near",),
    "a lot of": ("lots of", "plenty of"),
    "lots of": ("a lot of", "plenty of"),
    "full of": ("filled with",),
    "a group of": ("a bunch of",),
    "looking at": ("gazing at", "watching"),
    "in the middle of": ("amid", "in the midst of"),
    "at night": ("after dark", "at nighttime"),
    "aerial view": ("bird's-eye view", "overhead view"),
    "top view": ("overhead view",),
}

# A caption that starts with one of these swaps it for another of the same group.
LEAD_FRAMES: tuple[tuple[str, ...], ...] = (
    (
        "a photo of",
        "a picture of",
        "an image of",
        "a photograph of",
        "a photo showing",
        "a picture showing",
        "an image showing",
    ),
    ("photo of", "picture of", "image of", "photograph of"),
)
# Neutral frames for captions with nothing to substitute ({} is the caption).
ADDED_FRAMES = ("an image of {}", "a picture of {}", "an image showing {}", "{}, in a picture")
# Most CLIP tokens a frame or a single substitution adds (tests check the tables keep to it).
FRAME_MARGIN = 4
# Rewrites with indexes below this are made distinct from each other where possible.
DISTINCT_INDEXES = 16

_ALGORITHM = 1  # bump when the procedure changes in a way that changes outputs
_SUBSTITUTE_P = 0.5
_ATTEMPTS = 24

RULES_VERSION = hashlib.sha256(
    json.dumps(
        {
            "algorithm": _ALGORITHM,
            "synonyms": SYNONYMS,
            "lead_frames": LEAD_FRAMES,
            "added_frames": ADDED_FRAMES,
            "p": _SUBSTITUTE_P,
            "attempts": _ATTEMPTS,
            "distinct": DISTINCT_INDEXES,
        },
        sort_keys=True,
    ).encode()
).hexdigest()[:12]

_CHUNK = re.compile(
    r"(?P<pre>[\"'“‘(\[]*)"
    r"(?P<word>[A-Za-z]+(?:-[A-Za-z]+)*)"
    r"(?P<poss>(?:['’]s)?)"
    r"(?P<post>[.,;:!?\"'”’)\]…]*)"
)
_MAX_PHRASE = max(len(key.split()) for key in SYNONYMS)
_FRAMES_BY_LENGTH = sorted(
    ((frame, group) for group in LEAD_FRAMES for frame in group),
    key=lambda item: -len(item[0].split()),
)
_DETERMINERS = (
    "a an the this that these those my our your his her their its some one two three four five "
    "six seven eight nine ten several many few various each every another close view group pair"
)
_LOWERABLE = frozenset(_DETERMINERS.split()) | frozenset(
    word for key in SYNONYMS for word in key.split()
)
_SENTENCE_END = (".", "!", "?", "…")


@dataclass(frozen=True)
class _Chunk:
    text: str  # the whitespace-free chunk as written
    pre: str = ""
    word: str = ""  # empty: not a word chunk
    poss: str = ""
    post: str = ""


@dataclass(frozen=True)
class _Slot:
    start: int  # chunk indexes [start, stop)
    stop: int
    options: tuple[str, ...]  # lower case replacements
    case: str  # "lower", "title", "upper" (of the first replaced word) or "words" (all title)


@dataclass(frozen=True)
class _Plan:
    chunks: tuple[_Chunk, ...]
    slots: tuple[_Slot, ...]
    lead_frame: bool  # the first slot swaps a leading "a photo of"; no frame is added then
    upper: bool  # the whole caption is upper case
    capital: bool  # the caption starts with a capital letter


def _case(word: str) -> str:
    if word.islower():
        return "lower"
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return "title"
    if word.isupper():
        return "upper"
    return "mixed"


def _apply_case(text: str, case: str) -> str:
    if case == "words":
        return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))
    if case == "title":
        return text[:1].upper() + text[1:]
    if case == "upper":
        return text.upper()
    return text


def _plan(text: str) -> _Plan:
    chunks = []
    for raw in text.split(" "):
        match = _CHUNK.fullmatch(raw)
        chunks.append(_Chunk(raw, **match.groupdict()) if match else _Chunk(raw))
    upper = any(ch.isupper() for ch in text) and not any(ch.islower() for ch in text)

    def usable(i: int) -> str | None:
        """The case of chunk i's word when it may be replaced, else None."""
        chunk = chunks[i]
        if not chunk.word:
            return None
        case = _case(chunk.word)
        if upper:  # no lower case letters anywhere: every word is upper case
            return "upper"
        if case == "lower":
            return case
        if case != "title":
            return None
        sentence_start = i == 0 or chunks[i - 1].text.endswith(_SENTENCE_END)
        after = chunks[i + 1].word if i + 1 < len(chunks) else ""
        return case if sentence_start and not (after and after[0].isupper()) else None

    def phrase(i: int, n: int) -> tuple[str, str] | None:
        """(key, case) when chunks i..i+n-1 form one replaceable phrase."""
        if i + n > len(chunks):
            return None
        case = usable(i)
        if case is None:
            return None
        for j in range(i, i + n):
            chunk = chunks[j]
            if j > i and (chunk.pre or usable(j) not in ("lower", "upper")):
                return None
            if j < i + n - 1 and (chunk.poss or chunk.post):
                return None
        return " ".join(chunks[j].word.lower() for j in range(i, i + n)), case

    slots: list[_Slot] = []
    lead_frame = False
    i = 0
    for frame, group in _FRAMES_BY_LENGTH:
        size = len(frame.split())
        head = chunks[:size]
        if (
            len(head) == size
            and " ".join(chunk.text.lower() for chunk in head) == frame
            and all(chunk.word == chunk.text for chunk in head)  # no punctuation around
        ):
            cases = {_case(chunk.word) for chunk in head}
            # "A Photo Of" (title case words) gets "An Image Of"; else the first word's case
            case = "upper" if upper else "words" if cases == {"title"} else _case(head[0].word)
            if case != "mixed":
                options = tuple(other for other in group if other != frame)
                slots.append(_Slot(0, size, options, case))
                lead_frame = True
                i = size
            break
    while i < len(chunks):
        for n in range(min(_MAX_PHRASE, len(chunks) - i), 0, -1):
            found = phrase(i, n)
            if found and found[0] in SYNONYMS:
                slots.append(_Slot(i, i + n, SYNONYMS[found[0]], found[1]))
                i += n
                break
        else:
            i += 1
    capital = text[:1].isupper()
    return _Plan(tuple(chunks), tuple(slots), lead_frame, upper, capital)


def _article(word: str) -> str:
    """'a' or 'an' before `word` (spelling heuristic, good enough for the table's words)."""
    lower = word.lower()
    if lower.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if lower.startswith(("uni", "use", "usu", "uti", "euro", "one", "once", "ur")):
        return "a"
    return "an" if lower[:1] in "aeiou" else "a"


def _render(plan: _Plan, picks: dict[int, int], frame: int | None) -> str:
    words = [chunk.text for chunk in plan.chunks]
    for s, option in picks.items():
        slot = plan.slots[s]
        first, last = plan.chunks[slot.start], plan.chunks[slot.stop - 1]
        replacement = _apply_case(slot.options[option], slot.case)
        words[slot.start] = first.pre + replacement + last.poss + last.post
        for j in range(slot.start + 1, slot.stop):
            words[j] = ""
        before = plan.chunks[slot.start - 1] if slot.start else None
        if before and before.word.lower() in ("a", "an") and before.text == before.word:
            article = _article(replacement)
            case = "upper" if plan.upper else _case(before.word)
            words[slot.start - 1] = _apply_case(article, case)
    body = " ".join(word for word in words if word)
    if frame is None:
        return body
    template = ADDED_FRAMES[frame]
    if plan.upper:
        return template.upper().format(body)
    if template.startswith("{}"):
        end = re.search(r"[.!?…]+$", body)
        cut = end.start() if end else len(body)
        return template.format(body[:cut]) + body[cut:]
    # "The dog" -> "an image of the dog", but "Old Town Hall" stays capitalised
    head = re.match(r"([A-Z][a-z]*)(?: (\S))?", body)
    if head and head.group(1).lower() in _LOWERABLE and not (head.group(2) or "").isupper():
        body = body[0].lower() + body[1:]
    if plan.capital:
        template = template[0].upper() + template[1:]
    return template.format(body)


def _below(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)  # random() alone: stable across Python versions


def _draw(plan: _Plan, rng: random.Random, frames: bool) -> tuple[dict[int, int], int | None]:
    picks = {}
    for s, slot in enumerate(plan.slots):
        if rng.random() < _SUBSTITUTE_P:
            picks[s] = _below(rng, len(slot.options))
    frame = _below(rng, len(ADDED_FRAMES)) if frames else None
    if not picks and frame is None:
        s = _below(rng, len(plan.slots))
        picks[s] = _below(rng, len(plan.slots[s].options))
    return picks, frame


def _one(
    plan: _Plan, text: str, key: str, seen: set[str], limit: int | None, frames_ok: bool
) -> str:
    def fits(candidate: str) -> bool:
        return limit is None or clip_token_count(candidate, at_most=limit) <= limit

    for attempt in range(_ATTEMPTS):
        digest = hashlib.blake2b(f"{key}:{attempt}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "big"))
        # frames only when there is nothing to substitute, or substitutions ran out of variety
        frames = frames_ok and (not plan.slots or attempt >= _ATTEMPTS // 2)
        candidate = _render(plan, *_draw(plan, rng, frames))
        if comparable(candidate) not in seen and fits(candidate):
            return candidate
    # Smallest changes, shortest first: one substitution, or one frame.
    options = [
        _render(plan, {s: o}, None)
        for s, slot in enumerate(plan.slots)
        for o in range(len(slot.options))
    ]
    if frames_ok:
        options += [_render(plan, {}, f) for f in range(len(ADDED_FRAMES))]
    # shortest first; past the cap the order is the options' own (counting on costs BPE time)
    options.sort(key=lambda c: clip_token_count(c, at_most=MAX_CLIP_TOKENS))
    for candidate in options:
        if comparable(candidate) not in seen and fits(candidate):
            return candidate
    return next((c for c in options if fits(c)), options[0])


def rules_rewrite(caption: str, *, uid: str, index: int, seed: int) -> str:
    """A deterministic word-level paraphrase of `caption` (rewrite `index` of sample `uid`).

    An empty caption gives an empty string (which `check_rewrite` reports as "empty").
    """
    if index < 0:
        raise ValueError(f"rewrite index must be >= 0, not {index}")
    text = " ".join(one_line(caption).split())
    if not text:
        return ""
    plan = _plan(text)
    tokens = clip_token_count(text, at_most=MAX_CLIP_TOKENS)
    limit = MAX_CLIP_TOKENS if tokens <= MAX_CLIP_TOKENS else None
    # Over the limit: substitutions only, unless there is nothing to substitute.
    frames_ok = not plan.lead_frame and (limit is not None or not plan.slots)
    seen = {comparable(text)}
    result = text
    for j in range(0 if index < DISTINCT_INDEXES else index, index + 1):
        result = _one(plan, text, f"rules:{seed}:{uid}:{j}:{text}", seen, limit, frames_ok)
        seen.add(comparable(result))
    return result
