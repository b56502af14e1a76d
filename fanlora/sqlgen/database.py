"""A synthetic insurance database in SQLite, the same for the same seed (stand-in for the paper's Q2SQL data).

Six tables with the usual shape of an insurer's records: agents sell policies to customers; a policy has
coverages, payments and claims. Values are drawn from realistic ranges (premiums by policy type, claim
amounts by claim type, dates 2015–2024), with skew so that group-by answers are not all ties.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import date, timedelta
from pathlib import Path

SCHEMA = """
CREATE TABLE agents (
  agent_id INTEGER PRIMARY KEY, first_name TEXT NOT NULL, last_name TEXT NOT NULL, region TEXT NOT NULL,
  hire_date TEXT NOT NULL, commission_rate REAL NOT NULL
);
CREATE TABLE customers (
  customer_id INTEGER PRIMARY KEY, first_name TEXT NOT NULL, last_name TEXT NOT NULL, birth_date TEXT NOT NULL,
  gender TEXT NOT NULL, city TEXT NOT NULL, state TEXT NOT NULL, email TEXT, signup_date TEXT NOT NULL,
  agent_id INTEGER REFERENCES agents(agent_id)
);
CREATE TABLE policies (
  policy_id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(customer_id),
  agent_id INTEGER NOT NULL REFERENCES agents(agent_id), policy_type TEXT NOT NULL, start_date TEXT NOT NULL,
  end_date TEXT NOT NULL, annual_premium REAL NOT NULL, status TEXT NOT NULL
);
CREATE TABLE coverages (
  coverage_id INTEGER PRIMARY KEY, policy_id INTEGER NOT NULL REFERENCES policies(policy_id),
  coverage_type TEXT NOT NULL, limit_amount REAL NOT NULL, deductible REAL NOT NULL
);
CREATE TABLE claims (
  claim_id INTEGER PRIMARY KEY, policy_id INTEGER NOT NULL REFERENCES policies(policy_id), claim_date TEXT NOT NULL,
  claim_type TEXT NOT NULL, amount_claimed REAL NOT NULL, amount_paid REAL, status TEXT NOT NULL
);
CREATE TABLE payments (
  payment_id INTEGER PRIMARY KEY, policy_id INTEGER NOT NULL REFERENCES policies(policy_id),
  payment_date TEXT NOT NULL, amount REAL NOT NULL, method TEXT NOT NULL
);
"""

# the schema as the model sees it in every prompt: one line per table
PROMPT_SCHEMA = "\n".join(
    [
        "agents(agent_id, first_name, last_name, region, hire_date, commission_rate)",
        "customers(customer_id, first_name, last_name, birth_date, gender, city, state, email, signup_date, agent_id)",
        "policies(policy_id, customer_id, agent_id, policy_type, start_date, end_date, annual_premium, status)",
        "coverages(coverage_id, policy_id, coverage_type, limit_amount, deductible)",
        "claims(claim_id, policy_id, claim_date, claim_type, amount_claimed, amount_paid, status)",
        "payments(payment_id, policy_id, payment_date, amount, method)",
    ]
)

FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Carlos",
    "Karen",
    "Daniel",
    "Lisa",
    "Matthew",
    "Nancy",
    "Anthony",
    "Betty",
    "Mark",
    "Sandra",
    "Steven",
    "Ashley",
    "Paul",
    "Emily",
    "Andrew",
    "Kimberly",
    "Joshua",
    "Donna",
    "Kevin",
    "Michelle",
    "Brian",
    "Carol",
    "George",
    "Amanda",
    "Aisha",
    "Wei",
    "Priya",
    "Diego",
    "Fatima",
    "Hiro",
    "Olga",
    "Mateo",
    "Chloe",
]
LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Chen",
    "Patel",
    "Kim",
    "Novak",
]
CITIES = {
    "CA": ["Los Angeles", "San Diego", "San Jose", "Fresno", "Sacramento"],
    "TX": ["Houston", "Dallas", "Austin", "San Antonio", "El Paso"],
    "NY": ["New York", "Buffalo", "Rochester", "Albany"],
    "FL": ["Miami", "Orlando", "Tampa", "Jacksonville"],
    "IL": ["Chicago", "Springfield", "Peoria"],
    "WA": ["Seattle", "Spokane", "Tacoma"],
    "GA": ["Atlanta", "Savannah", "Augusta"],
    "OH": ["Columbus", "Cleveland", "Cincinnati"],
    "AZ": ["Phoenix", "Tucson", "Mesa"],
    "CO": ["Denver", "Boulder", "Aurora"],
}
STATE_WEIGHTS = {"CA": 18, "TX": 15, "NY": 12, "FL": 11, "IL": 8, "WA": 7, "GA": 7, "OH": 8, "AZ": 7, "CO": 7}
REGIONS = ("North", "South", "East", "West", "Central")
POLICY_TYPES = {
    "auto": (600, 2400),
    "home": (800, 3200),
    "life": (300, 1800),
    "health": (2000, 9000),
    "travel": (80, 400),
}
POLICY_TYPE_WEIGHTS = (34, 24, 14, 20, 8)
POLICY_STATUS = (("active", 55), ("expired", 25), ("lapsed", 10), ("cancelled", 10))
COVERAGES = {
    "auto": ["collision", "liability", "comprehensive", "uninsured motorist"],
    "home": ["dwelling", "personal property", "liability", "flood"],
    "life": ["death benefit", "accidental death"],
    "health": ["hospital", "outpatient", "prescription", "dental"],
    "travel": ["trip cancellation", "medical", "baggage"],
}
CLAIM_TYPES = {
    "auto": [("collision", 1500, 18000), ("theft", 3000, 30000), ("glass", 150, 1200)],
    "home": [("fire", 5000, 120000), ("water damage", 1000, 25000), ("theft", 500, 15000), ("storm", 2000, 60000)],
    "life": [("death", 50000, 500000)],
    "health": [("hospitalization", 2000, 80000), ("outpatient", 100, 4000), ("prescription", 20, 1500)],
    "travel": [("trip cancellation", 300, 5000), ("lost baggage", 100, 2500), ("medical", 500, 20000)],
}
CLAIM_STATUS = (("paid", 45), ("approved", 15), ("denied", 20), ("open", 20))
PAYMENT_METHODS = (("card", 45), ("bank_transfer", 35), ("check", 15), ("cash", 5))

START = date(2015, 1, 1)
END = date(2024, 12, 31)


def _day(rng: random.Random, lo: date = START, hi: date = END) -> date:
    return lo + timedelta(days=rng.randrange((hi - lo).days + 1))


def _pick(rng: random.Random, weighted: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def _agents(rng: random.Random) -> list[tuple]:
    return [
        (
            i,
            rng.choice(FIRST),
            rng.choice(LAST),
            rng.choice(REGIONS),
            _day(rng, START, date(2022, 12, 31)).isoformat(),
            round(rng.uniform(0.03, 0.15), 3),
        )
        for i in range(1, 61)
    ]


def _customers(rng: random.Random, n: int) -> list[tuple]:
    customers = []
    states = list(STATE_WEIGHTS)
    for i in range(1, n + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        state = rng.choices(states, [STATE_WEIGHTS[s] for s in states])[0]
        email = None if rng.random() < 0.08 else f"{first.lower()}.{last.lower()}{i}@example.com"
        born = _day(rng, date(1945, 1, 1), date(2004, 12, 31)).isoformat()
        gender, city = rng.choice("FM"), rng.choice(CITIES[state])
        customers.append(
            (i, first, last, born, gender, city, state, email, _day(rng).isoformat(), rng.randrange(1, 61))
        )
    return customers


def _policy(rng: random.Random, cust: tuple, tables: dict[str, list[tuple]]) -> None:
    """One policy of ``cust`` with its coverages, premium payments and claims (in this order of draws)."""
    policies, coverages = tables["policies"], tables["coverages"]
    pid = len(policies) + 1
    ptype = rng.choices(list(POLICY_TYPES), POLICY_TYPE_WEIGHTS)[0]
    start = _day(rng, START, date(2024, 6, 30))
    end = start + timedelta(days=365 * rng.choice((1, 1, 1, 2, 3)))
    lo, hi = POLICY_TYPES[ptype]
    premium = round(rng.uniform(lo, hi), 2)
    agent = cust[9] if rng.random() < 0.8 else rng.randrange(1, 61)
    policies.append(
        (pid, cust[0], agent, ptype, start.isoformat(), end.isoformat(), premium, _pick(rng, POLICY_STATUS))
    )
    for ctype in rng.sample(COVERAGES[ptype], rng.randint(1, len(COVERAGES[ptype]))):
        limit = float(rng.choice((5, 10, 25, 50, 100, 250, 500, 1000)) * 1000)
        deductible = float(rng.choice((0, 100, 250, 500, 1000, 2500)))
        coverages.append((len(coverages) + 1, pid, ctype, limit, deductible))
    last_day = min(end, END)
    payments = tables["payments"]
    for k in range(max(1, (last_day - start).days // 120)):
        when = start + timedelta(days=120 * k + rng.randrange(0, 10))
        if when > last_day:
            break
        payments.append((len(payments) + 1, pid, when.isoformat(), round(premium / 3, 2), _pick(rng, PAYMENT_METHODS)))
    claims = tables["claims"]
    for _ in range(rng.choices((0, 1, 2), (55, 35, 10))[0]):
        ctype, lo_c, hi_c = rng.choice(CLAIM_TYPES[ptype])
        amount = round(rng.uniform(lo_c, hi_c), 2)
        status = _pick(rng, CLAIM_STATUS)
        paid = round(amount * rng.uniform(0.5, 1.0), 2) if status == "paid" else (0.0 if status == "denied" else None)
        claims.append((len(claims) + 1, pid, _day(rng, start, last_day).isoformat(), ctype, amount, paid, status))


TABLES = ("agents", "customers", "policies", "coverages", "claims", "payments")


def build_database(path: str | Path, seed: int = 0, n_customers: int = 2000) -> dict[str, int]:
    """Write the database to ``path`` (which must not exist); return the row count of each table.

    Every value comes from one ``random.Random(seed)`` in a fixed order of draws, so the same seed gives the
    same database byte for byte (the SQL task's splits and gold results depend on it).
    """
    rng = random.Random(seed)
    tables: dict[str, list[tuple]] = {t: [] for t in TABLES}
    tables["agents"] = _agents(rng)
    tables["customers"] = _customers(rng, n_customers)
    for cust in tables["customers"]:
        for _ in range(rng.choices((1, 2, 3, 4), (45, 33, 15, 7))[0]):
            _policy(rng, cust, tables)
    conn = sqlite3.connect(str(path))
    conn.executescript(SCHEMA)
    for name in TABLES:
        rows = tables[name]
        conn.executemany(f"INSERT INTO {name} VALUES ({','.join('?' * len(rows[0]))})", rows)
    conn.commit()
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    conn.close()
    return counts
