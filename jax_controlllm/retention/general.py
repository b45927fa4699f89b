"""General-knowledge probes and plain English text for measuring what a model keeps.

Retention is measured only on probes the *base* model answers correctly (``verified_probes``): a probe it
never knew cannot be forgotten. The facts are common world knowledge phrased as completions whose answer is a
single short word; the text passages are plain, neutral prose for the KL-from-base measurement.
"""
from __future__ import annotations

# (prompt, answer): the answer starts with a space so its first token follows the prompt directly.
FACTS: tuple[tuple[str, str], ...] = (
    ("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin"),
    ("The capital of Italy is", " Rome"), ("The capital of Spain is", " Madrid"),
    ("The capital of Japan is", " Tokyo"), ("The capital of England is", " London"),
    ("The capital of Russia is", " Moscow"), ("The capital of China is", " Beijing"),
    ("The capital of Egypt is", " Cairo"), ("The capital of Greece is", " Athens"),
    ("The capital of Portugal is", " Lisbon"), ("The capital of Austria is", " Vienna"),
    ("The capital of Ireland is", " Dublin"), ("The capital of Canada is", " Ottawa"),
    ("The capital of Australia is", " Canberra"), ("The capital of Norway is", " Oslo"),
    ("The capital of Sweden is", " Stockholm"), ("The capital of Poland is", " Warsaw"),
    ("The capital of the United States is", " Washington"), ("The capital of India is", " New"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("The planet closest to the Sun is", " Mercury"), ("The Red Planet is also called", " Mars"),
    ("Water freezes at zero degrees", " Celsius"), ("The chemical symbol for gold is", " Au"),
    ("The chemical symbol for water is", " H"), ("The opposite of hot is", " cold"),
    ("The opposite of up is", " down"), ("The opposite of day is", " night"),
    ("The opposite of black is", " white"), ("A baby cat is called a", " kitten"),
    ("A baby dog is called a", " puppy"), ("The color of the sky on a clear day is", " blue"),
    ("The color of grass is", " green"), ("Bananas are usually the color", " yellow"),
    ("One, two, three, four,", " five"), ("Monday, Tuesday,", " Wednesday"),
    ("January, February,", " March"), ("The first month of the year is", " January"),
    ("The last month of the year is", " December"), ("There are seven days in a", " week"),
    ("There are twelve months in a", " year"), ("The Eiffel Tower is in the city of", " Paris"),
    ("The Statue of Liberty is in New", " York"), ("The Great Wall is in", " China"),
    ("The Colosseum is in the city of", " Rome"), ("Romeo and Juliet was written by William", " Shakespeare"),
    ("The theory of relativity was developed by Albert", " Einstein"),
    ("The first man on the Moon was Neil", " Armstrong"), ("The Mona Lisa was painted by Leonardo da", " Vinci"),
    ("The author of Harry Potter is J. K.", " Rowling"), ("The currency of Japan is the", " yen"),
    ("The currency of the United Kingdom is the pound", " sterling"), ("Bees make", " honey"),
    ("Cows give us", " milk"), ("The fastest land animal is the", " cheetah"),
    ("The largest ocean on Earth is the", " Pacific"), ("The longest river in Africa is the", " Nile"),
    ("The tallest mountain in the world is Mount", " Everest"), ("The square root of nine is", " three"),
    ("Two plus two equals", " four"), ("Ten minus three equals", " seven"),
    ("The freezing point of water in Fahrenheit is 32", " degrees"), ("Humans breathe in", " oxygen"),
    ("Plants make food through", " photosynthesis"), ("The hardest natural substance is", " diamond"),
    ("The smallest prime number is", " two"), ("A triangle has three", " sides"),
    ("A square has four", " sides"), ("The language spoken in Brazil is", " Portuguese"),
    ("The language spoken in Mexico is", " Spanish"), ("The language spoken in Germany is", " German"),
)

# Plain prose (our own) for the mean KL of next-token distributions from the base model.
GENERAL_TEXT: tuple[str, ...] = (
    "The morning train was late again, so most of the passengers waited on the platform with their coffee. "
    "A few of them read newspapers, and a child counted the pigeons walking along the edge of the tracks.",
    "Cooking rice well takes patience. Rinse the grains until the water runs clear, add a little more water "
    "than rice, bring it to a boil, then cover the pot and let it simmer on a low heat.",
    "The library on the corner opens at nine. Students come early to find a quiet table near the windows, "
    "where the light is good and the noise from the street is muffled by the old stone walls.",
    "In spring the farmers plant their fields with wheat and barley. By late summer the crops are tall and "
    "golden, and the harvest begins as soon as the weather is dry enough for the machines.",
    "Learning a new language is easier when you practise a little every day. Reading short stories, listening "
    "to the radio and talking with friends all help you remember new words.",
    "The museum has a large collection of paintings, sculptures and old maps. Visitors often spend hours in the "
    "main hall, where the ceiling is painted with scenes from ancient history.",
    "A healthy breakfast gives you energy for the day. Many people eat bread, fruit and yogurt, while others "
    "prefer eggs, cheese or a bowl of warm porridge with honey.",
    "The river runs through the middle of the town. On warm evenings people walk along its banks, watch the "
    "boats go by and sit on the benches under the trees until the sun goes down.",
)
