"""Word lists for synthetic biographies. Cities, majors and first names are ordinary words; surnames,
universities and companies are invented, so facts about fictional people are new to any model."""
from __future__ import annotations

FIRST_NAMES = (
    "Mara", "Tobias", "Ilse", "Dorian", "Petra", "Emil", "Rosa", "Anton", "Lena", "Hugo", "Nadia", "Felix",
    "Greta", "Oscar", "Vera", "Jonas", "Alma", "Victor", "Clara", "Simon", "Nora", "Arthur", "Helena", "Leon",
    "Iris", "Marcus", "Elsa", "Julian", "Lydia", "Casper", "Maren", "Rufus", "Thea", "Bruno", "Selma", "Ivan",
    "Freya", "Otto", "Wanda", "Milo", "Agnes", "Cyril", "Hanna", "Rafael", "Edith", "Gustav", "Livia", "Dario",
    "Ruth", "Konrad", "Sofia", "Elias", "Paula", "Boris", "Carmen", "Mateo", "Ingrid", "Silas", "Olga", "Tomas",
)

# Surnames are built from these parts ("Vel" + "karis" -> "Velkaris"): 40 x 30 = 1200 names no model has seen.
SURNAME_HEADS = (
    "Vel", "Dra", "Quor", "Bal", "Thes", "Mor", "Kel", "Zan", "Orr", "Fen", "Gal", "Hav", "Isk", "Jor", "Lum",
    "Nev", "Pra", "Riv", "Sar", "Tal", "Ulv", "Var", "Wen", "Yss", "Cor", "Dun", "Ebb", "Fal", "Grin", "Hol",
    "Ost", "Pell", "Rand", "Stav", "Trem", "Vask", "Brel", "Carn", "Dov", "Marr",
)
SURNAME_TAILS = (
    "karis", "eth", "ington", "ova", "mere", "wick", "ander", "ussen", "ello", "ard", "iven", "osk", "ley",
    "orne", "avik", "enko", "ath", "ridge", "ton", "ique", "ssa", "bury", "holm", "ado", "ecki", "ford",
    "anis", "oth", "ery", "undo",
)

# Well-known people: a model already has facts about them; their attributes get *revised* (relevant knowledge).
KNOWN_PEOPLE = (
    "Albert Einstein", "Marie Curie", "Isaac Newton", "Charles Darwin", "Ada Lovelace", "Nikola Tesla",
    "William Shakespeare", "Jane Austen", "Leonardo da Vinci", "Galileo Galilei", "Ludwig van Beethoven",
    "Vincent van Gogh", "Florence Nightingale", "Abraham Lincoln", "Napoleon Bonaparte", "Cleopatra",
    "Mahatma Gandhi", "Nelson Mandela", "Frida Kahlo", "Pablo Picasso", "Charles Dickens", "Mark Twain",
    "Alan Turing", "Rosalind Franklin", "Johann Sebastian Bach", "Winston Churchill", "Queen Victoria",
    "Amelia Earhart", "Thomas Edison", "Sigmund Freud", "Karl Marx", "Leo Tolstoy", "Virginia Woolf",
    "Louis Pasteur", "Johannes Kepler", "Michelangelo", "Confucius", "Aristotle", "Plato", "Homer",
)

CITIES = (
    "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Cairo", "Lima", "Nairobi", "Osaka", "Seoul",
    "Hanoi", "Manila", "Jakarta", "Sydney", "Toronto", "Chicago", "Denver", "Boston", "Seattle", "Houston",
    "Munich", "Hamburg", "Zurich", "Geneva", "Milan", "Naples", "Athens", "Warsaw", "Budapest", "Helsinki",
    "Stockholm", "Copenhagen", "Porto", "Seville", "Valencia", "Marseille", "Lyon", "Brussels", "Amsterdam",
    "Montreal", "Vancouver", "Quito", "Santiago", "Havana", "Casablanca", "Tunis", "Accra", "Lagos", "Mumbai",
    "Delhi", "Bangkok", "Singapore", "Auckland", "Perth", "Adelaide", "Glasgow", "Krakow", "Bologna", "Kyoto",
)

UNIVERSITIES = (
    "Harrowgate University", "Elmsworth University", "Corvell University", "Brackenridge University",
    "Wynfield University", "Stonemere University", "Larkspur University", "Thornbury University",
    "Galloway University", "Pellham University", "Ravenholt University", "Ashcombe University",
    "Marwood University", "Fenwick University", "Kingsleigh University", "Oakhurst University",
    "Bellmoor University", "Dunmore University", "Heathcliff University", "Quarrybrook University",
    "Silverdale University", "Whitcombe University", "Norbridge University", "Eastvale University",
)

MAJORS = (
    "Chemistry", "Physics", "Mathematics", "Economics", "Philosophy", "Linguistics", "Biology", "Geology",
    "Astronomy", "Architecture", "Sociology", "Psychology", "History", "Literature", "Statistics",
    "Engineering", "Medicine", "Music", "Anthropology", "Journalism", "Law", "Nursing", "Accounting",
    "Agriculture", "Ecology", "Theology", "Oceanography", "Archaeology",
)

COMPANIES = (
    "Brightloom", "Quillon", "Vantrel", "Orbisoft", "Tessaline", "Kestrelworks", "Novarune", "Celadyne",
    "Pinemark", "Driftwell", "Lumacore", "Halvex", "Sablewind", "Corvantis", "Mistral Forge", "Amberlane",
    "Glimmerpoint", "Ironvale", "Zephyrix", "Northtide", "Quartzline", "Bluecairn", "Embermoor", "Tidewright",
)

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
