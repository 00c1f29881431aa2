"""The passages, questions and answers that :mod:`lcm.evals.giraffe`'s QA tasks plant in a long document.

Giraffe's WikiQA (Pal et al. 2023, arXiv 2308.10882) takes its questions and short answers from Google's Natural
Questions and its documents from Wikipedia. lcm ships no such data, so this is our own small bank in the same
spirit: a short encyclopaedic passage of general knowledge, a question that the passage alone answers, and a short
answer copied verbatim from the passage (NaturalQuestions' "short answer" style: a name, a word or a number).
Numeric answers are plain digit strings (no thousands separators) so that AlteredNumericQA can rewrite every
occurrence of the number without touching formatting; none has fewer than two digits, since almost every one- and
two-digit string occurs somewhere in the haystack prose.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Fact:
    passage: str  # the planted paragraph, the only place in the document that answers the question
    question: str  # asked after the document
    answer: str  # a span of the passage; scored by presence in the continuation (case-sensitive)

    def __post_init__(self) -> None:
        if self.answer not in self.passage:
            raise ValueError(f"answer {self.answer!r} is not a span of its passage {self.passage[:60]!r}...")
        if self.answer in self.question:
            raise ValueError(f"the question {self.question!r} gives its own answer away")

    @property
    def numeric(self) -> bool:
        return self.answer.isdigit()


FACTS: tuple[Fact, ...] = (
    # --- numeric answers: years (AlteredNumericQA shifts them by at most 10) ---
    Fact(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was designed by the "
        "engineering company of Gustave Eiffel and was completed in 1889 as the entrance arch to that year's "
        "World's Fair.",
        "In what year was the Eiffel Tower completed?",
        "1889",
    ),
    Fact(
        "Apollo 11 was the American spaceflight that first landed humans on the Moon. Commander Neil Armstrong and "
        "lunar module pilot Buzz Aldrin landed the lunar module Eagle on 20 July 1969.",
        "In what year did Apollo 11 land on the Moon?",
        "1969",
    ),
    Fact(
        "The Berlin Wall was a guarded concrete barrier that divided Berlin from 1961. It fell on 9 November 1989, "
        "when the East German authorities opened the border crossings.",
        "In what year did the Berlin Wall fall?",
        "1989",
    ),
    Fact(
        "RMS Titanic was a British passenger liner operated by the White Star Line. It sank in the North Atlantic "
        "Ocean on 15 April 1912 after striking an iceberg during its maiden voyage from Southampton to New York City.",
        "In what year did the Titanic sink?",
        "1912",
    ),
    Fact(
        "Magna Carta is a royal charter of rights agreed to by King John of England at Runnymede, near Windsor, on "
        "15 June 1215.",
        "In what year was Magna Carta agreed to by King John?",
        "1215",
    ),
    Fact(
        "The United States Declaration of Independence was adopted by the Second Continental Congress meeting in "
        "Philadelphia on July 4, 1776.",
        "In what year was the United States Declaration of Independence adopted?",
        "1776",
    ),
    Fact(
        "William Shakespeare was an English playwright, poet and actor. He was born in Stratford-upon-Avon in 1564 "
        "and died there in 1616.",
        "In what year was William Shakespeare born?",
        "1564",
    ),
    Fact(
        "The Statue of Liberty is a colossal neoclassical sculpture on Liberty Island in New York Harbor. It was a "
        "gift from the people of France and was dedicated on October 28, 1886.",
        "In what year was the Statue of Liberty dedicated?",
        "1886",
    ),
    Fact(
        "The Battle of Hastings was fought on 14 October 1066 between the Norman-French army of William, the Duke of "
        "Normandy, and an English army under King Harold Godwinson.",
        "In what year was the Battle of Hastings fought?",
        "1066",
    ),
    Fact(
        "Christopher Columbus completed four voyages across the Atlantic Ocean. On his first voyage, which set sail "
        "from Palos de la Frontera in 1492, he reached the Bahamas.",
        "In what year did Columbus set sail on his first voyage across the Atlantic?",
        "1492",
    ),
    Fact(
        "The first modern Olympic Games were held in Athens, Greece, in 1896, organised by the International "
        "Olympic Committee that Pierre de Coubertin had helped to found two years earlier.",
        "In what year were the first modern Olympic Games held?",
        "1896",
    ),
    Fact(
        "The storming of the Bastille took place in Paris on 14 July 1789, when revolutionaries seized the medieval "
        "fortress and armoury; the day is now the national holiday of France.",
        "In what year did the storming of the Bastille take place?",
        "1789",
    ),
    Fact(
        "Orville and Wilbur Wright made the first controlled, sustained flight of a powered aircraft near Kitty "
        "Hawk, North Carolina, on December 17, 1903.",
        "In what year did the Wright brothers make their first powered flight?",
        "1903",
    ),
    Fact(
        "Wolfgang Amadeus Mozart was a prolific composer of the Classical period. He was born in Salzburg in 1756 "
        "and composed more than 800 works before his death at the age of 35.",
        "In what year was Wolfgang Amadeus Mozart born?",
        "1756",
    ),
    # --- numeric answers: other numbers (AlteredNumericQA keeps their digit count) ---
    Fact(
        "Mount Everest is the highest mountain on Earth above sea level, in the Mahalangur Himal sub-range of the "
        "Himalayas. A 2020 survey by China and Nepal put its height, rounded to the nearest metre, at 8849 metres.",
        "How high is Mount Everest in metres, according to the 2020 survey?",
        "8849",
    ),
    Fact(
        "The speed of light in vacuum is a universal physical constant. By the definition of the metre, it is "
        "exactly 299792458 metres per second.",
        "What is the speed of light in vacuum, in metres per second?",
        "299792458",
    ),
    Fact(
        "The United Nations is an intergovernmental organisation founded after the Second World War. It has 193 "
        "member states; the most recent to join was South Sudan in 2011.",
        "How many member states does the United Nations have?",
        "193",
    ),
    Fact(
        "The Great Pyramid of Giza is the oldest of the Seven Wonders of the Ancient World. When it was completed it "
        "stood about 146 metres tall, and it remained the tallest human-made structure for more than 3800 years.",
        "How tall was the Great Pyramid of Giza when it was completed, in metres?",
        "146",
    ),
    Fact(
        "The skeleton of an adult human is made up of 206 bones. It supports the body, protects the internal "
        "organs and anchors the muscles.",
        "How many bones make up the skeleton of an adult human?",
        "206",
    ),
    Fact(
        "The marathon is a long-distance foot race, usually run on roads, with an official distance of 42195 "
        "metres, or about 26.2 miles.",
        "What is the official distance of a marathon in metres?",
        "42195",
    ),
    Fact(
        "A standard modern piano has 88 keys: 52 white keys and 36 black keys, spanning a little more than seven "
        "octaves.",
        "How many keys does a standard modern piano have?",
        "88",
    ),
    Fact(
        "At standard atmospheric pressure, pure water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
        "At how many degrees Fahrenheit does pure water boil at standard atmospheric pressure?",
        "212",
    ),
    Fact(
        "The Moon orbits Earth at an average distance of 384400 kilometres and completes one orbit relative to the "
        "stars about every 27.3 days.",
        "What is the average distance between the Moon and Earth, in kilometres?",
        "384400",
    ),
    Fact(
        "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa, rising to 5895 "
        "metres above sea level at its summit, Uhuru Peak.",
        "How high is Mount Kilimanjaro above sea level, in metres?",
        "5895",
    ),
    Fact(
        "The Burj Khalifa in Dubai, opened in 2010, is the tallest building in the world, with a total height of "
        "828 metres.",
        "What is the total height of the Burj Khalifa in metres?",
        "828",
    ),
    Fact(
        "Earth is the third planet from the Sun. Its circumference at the equator is about 40075 kilometres, "
        "slightly more than its circumference through the poles.",
        "What is the circumference of Earth at the equator, in kilometres?",
        "40075",
    ),
    Fact(
        "Angel Falls in Venezuela is the tallest uninterrupted waterfall in the world, with a height of 979 metres "
        "and a plunge of 807 metres.",
        "What is the height of Angel Falls in metres?",
        "979",
    ),
    # --- free-form answers ---
    Fact(
        "Canberra is the capital city of Australia. It was chosen as a compromise between the rival cities of "
        "Sydney and Melbourne and lies in the Australian Capital Territory.",
        "What is the capital city of Australia?",
        "Canberra",
    ),
    Fact(
        "The Mona Lisa is a half-length portrait painting by the Italian artist Leonardo da Vinci. It is displayed "
        "at the Louvre Museum in Paris.",
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci",
    ),
    Fact(
        "Jupiter is the fifth planet from the Sun and the largest in the Solar System. It is a gas giant whose mass "
        "is more than two and a half times that of all the other planets combined.",
        "Which planet is the largest in the Solar System?",
        "Jupiter",
    ),
    Fact(
        "Pride and Prejudice is an 1813 novel of manners written by the English author Jane Austen. It follows "
        "Elizabeth Bennet as she deals with manners, upbringing and marriage.",
        "Who wrote the novel Pride and Prejudice?",
        "Jane Austen",
    ),
    Fact(
        "The Pacific Ocean is the largest and deepest of the five oceanic divisions of Earth. It extends from the "
        "Arctic Ocean in the north to the Southern Ocean in the south.",
        "Which is the largest of the oceanic divisions of Earth?",
        "Pacific Ocean",
    ),
    Fact(
        "The theory of relativity usually encompasses two interrelated physics theories by Albert Einstein: special "
        "relativity and general relativity, published in 1905 and 1915 respectively.",
        "Who proposed the theories of special and general relativity?",
        "Albert Einstein",
    ),
    Fact(
        "The yen is the official currency of Japan. It is the third most traded currency in the foreign exchange "
        "market, after the United States dollar and the euro.",
        "What is the official currency of Japan?",
        "yen",
    ),
    Fact(
        "In plants, photosynthesis takes place mainly in the chloroplasts, organelles that contain the green "
        "pigment chlorophyll and capture energy from sunlight.",
        "In which organelles does photosynthesis mainly take place in plants?",
        "chloroplasts",
    ),
    Fact(
        "Penicillin was discovered in 1928 by the Scottish scientist Alexander Fleming, who noticed that a mould had "
        "killed the bacteria growing on one of his culture plates.",
        "Who discovered penicillin?",
        "Alexander Fleming",
    ),
    Fact(
        "The giraffe is a large African hoofed mammal and the tallest living terrestrial animal. Its long neck and "
        "legs let it browse on leaves high in acacia trees.",
        "What is the tallest living terrestrial animal?",
        "giraffe",
    ),
    Fact(
        "The Symphony No. 9 in D minor is the final complete symphony by Ludwig van Beethoven. Its last movement "
        "sets the poem Ode to Joy for soloists and chorus.",
        "Who composed the symphony whose last movement sets the poem Ode to Joy?",
        "Ludwig van Beethoven",
    ),
    Fact(
        "The Great Barrier Reef is the largest coral reef system in the world. It stretches for more than 2300 "
        "kilometres off the coast of Queensland, Australia.",
        "Off the coast of which Australian state does the Great Barrier Reef lie?",
        "Queensland",
    ),
    Fact(
        "Ottawa is the capital city of Canada. It stands on the south bank of the Ottawa River in the eastern part "
        "of southern Ontario.",
        "What is the capital city of Canada?",
        "Ottawa",
    ),
    Fact(
        "Alexander Graham Bell was a Scottish-born inventor and scientist. In 1876 he was awarded the first United "
        "States patent for the telephone.",
        "Who was awarded the first United States patent for the telephone?",
        "Alexander Graham Bell",
    ),
    Fact(
        "Vatican City is an independent city-state surrounded by Rome, Italy. With an area of less than half a "
        "square kilometre, it is the smallest sovereign state in the world.",
        "What is the smallest sovereign state in the world by area?",
        "Vatican City",
    ),
    Fact(
        "The ceiling of the Sistine Chapel in Vatican City was painted by Michelangelo between 1508 and 1512. Its "
        "central panels show scenes from the Book of Genesis.",
        "Who painted the ceiling of the Sistine Chapel?",
        "Michelangelo",
    ),
)
