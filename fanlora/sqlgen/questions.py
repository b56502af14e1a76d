"""Question → SQL pairs over the insurance database, from a grammar of templates with varied wording.

Each intent (a kind of question: a filter, a join, an aggregate, a group-by, a top-N, a date range…) has one
gold SQL shape and several phrasings; slot values (cities, types, years, names, thresholds) are drawn from the
database itself so that most answers are non-empty. Pairs are deduplicated by question text, and every gold
query is executed once when the set is built (a gold that fails is a bug and stops the build).

Long by design: one short function per intent (26). Each template's random draws are part of the dataset's
identity — the same seed must give the same 4,000 pairs, and the SQL task's splits hash the gold queries — and
several templates derive slots (year ranges, months, name parts) in their own order of draws, which a generic
table would have to reproduce draw for draw. Adding an intent is adding one function to ``TEMPLATES``.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Facts = dict[str, list[Any]]
Template = Callable[[random.Random, Facts], tuple[str, str]]


@dataclass
class Pair:
    question: str
    sql: str
    intent: str


def facts(conn: sqlite3.Connection) -> Facts:
    """Slot values, read from the database."""

    def col(q: str) -> list[Any]:
        return [r[0] for r in conn.execute(q)]

    return {
        "state": col("SELECT DISTINCT state FROM customers ORDER BY state"),
        "city": col("SELECT DISTINCT city FROM customers ORDER BY city"),
        "ptype": col("SELECT DISTINCT policy_type FROM policies ORDER BY policy_type"),
        "pstatus": col("SELECT DISTINCT status FROM policies ORDER BY status"),
        "ctype": col("SELECT DISTINCT claim_type FROM claims ORDER BY claim_type"),
        "cstatus": col("SELECT DISTINCT status FROM claims ORDER BY status"),
        "cov": col("SELECT DISTINCT coverage_type FROM coverages ORDER BY coverage_type"),
        "method": col("SELECT DISTINCT method FROM payments ORDER BY method"),
        "region": col("SELECT DISTINCT region FROM agents ORDER BY region"),
        "customer": col(
            "SELECT first_name || ' ' || last_name FROM customers GROUP BY 1 HAVING COUNT(*) = 1 ORDER BY 1"
        ),
        "agent": col("SELECT first_name || ' ' || last_name FROM agents GROUP BY 1 HAVING COUNT(*) = 1 ORDER BY 1"),
        "year": list(range(2015, 2025)),
    }


def _q(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _name(full: str) -> tuple[str, str]:
    first, last = full.split(" ", 1)
    return first, last


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def count_customers_state(r: random.Random, f: Facts) -> tuple[str, str]:
    s = r.choice(f["state"])
    q = r.choice(
        [
            f"How many customers live in {s}?",
            f"Count the customers located in the state of {s}.",
            f"What is the number of customers from {s}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM customers WHERE state = {_q(s)};"


def list_customers_city(r: random.Random, f: Facts) -> tuple[str, str]:
    c = r.choice(f["city"])
    q = r.choice(
        [
            f"List the first and last names of customers in {c}, sorted by last name.",
            f"Which customers live in {c}? Give first and last name ordered by last name.",
            f"Show the names of all customers from {c} in order of last name.",
        ]
    )
    return q, f"SELECT first_name, last_name FROM customers WHERE city = {_q(c)} ORDER BY last_name, first_name;"


def count_policies_type_status(r: random.Random, f: Facts) -> tuple[str, str]:
    t, s = r.choice(f["ptype"]), r.choice(f["pstatus"])
    q = r.choice(
        [
            f"How many {t} policies are {s}?",
            f"Count the {s} policies of type {t}.",
            f"What is the number of {t} insurance policies with status {s}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM policies WHERE policy_type = {_q(t)} AND status = {_q(s)};"


def avg_premium_type(r: random.Random, f: Facts) -> tuple[str, str]:
    t = r.choice(f["ptype"])
    q = r.choice(
        [
            f"What is the average annual premium of {t} policies?",
            f"Give the mean yearly premium for {t} insurance.",
            f"On average, how much is the annual premium of a {t} policy?",
        ]
    )
    return q, f"SELECT AVG(annual_premium) FROM policies WHERE policy_type = {_q(t)};"


def total_claimed_type_year(r: random.Random, f: Facts) -> tuple[str, str]:
    c, y = r.choice(f["ctype"]), r.choice(f["year"])
    q = r.choice(
        [
            f"What was the total amount claimed for {c} claims in {y}?",
            f"Sum the claimed amounts of all {c} claims filed in {y}.",
            f"How much money was claimed in {y} for {c}?",
        ]
    )
    return q, (
        f"SELECT SUM(amount_claimed) FROM claims WHERE claim_type = {_q(c)} AND strftime('%Y', claim_date) = '{y}';"
    )


def claims_per_status(r: random.Random, f: Facts) -> tuple[str, str]:
    t = r.choice(f["ptype"])
    q = r.choice(
        [
            f"For {t} policies, how many claims are there in each claim status?",
            f"Count claims by status for {t} policies.",
            f"Break down the number of claims on {t} policies by status.",
        ]
    )
    return q, (
        f"SELECT c.status, COUNT(*) FROM claims c JOIN policies p ON c.policy_id = p.policy_id "
        f"WHERE p.policy_type = {_q(t)} GROUP BY c.status;"
    )


def top_customers_premium(r: random.Random, f: Facts) -> tuple[str, str]:
    n, s = r.randint(3, 10), r.choice(f["state"])
    q = r.choice(
        [
            f"Who are the top {n} customers in {s} by total annual premium? Give customer id and the total.",
            f"List the {n} customers from {s} with the highest total premium (id and total), highest first.",
            f"Which {n} customers in {s} pay the most in annual premiums in total? Show id and sum.",
        ]
    )
    return q, (
        f"SELECT c.customer_id, SUM(p.annual_premium) AS total FROM customers c JOIN policies p "
        f"ON c.customer_id = p.customer_id WHERE c.state = {_q(s)} GROUP BY c.customer_id "
        f"ORDER BY total DESC LIMIT {n};"
    )


def agents_region_commission(r: random.Random, f: Facts) -> tuple[str, str]:
    g, x = r.choice(f["region"]), r.choice((0.05, 0.08, 0.1, 0.12))
    q = r.choice(
        [
            f"Which agents in the {g} region have a commission rate above {x}? Give their names.",
            f"List first and last names of {g} region agents whose commission rate exceeds {x}.",
            f"Name the agents working in {g} with commission rate greater than {x}.",
        ]
    )
    return q, f"SELECT first_name, last_name FROM agents WHERE region = {_q(g)} AND commission_rate > {x};"


def policies_started_year(r: random.Random, f: Facts) -> tuple[str, str]:
    y, t = r.choice(f["year"]), r.choice(f["ptype"])
    q = r.choice(
        [
            f"How many {t} policies started in {y}?",
            f"Count {t} policies with a start date in {y}.",
            f"What number of {t} policies began during {y}?",
        ]
    )
    return q, (f"SELECT COUNT(*) FROM policies WHERE policy_type = {_q(t)} AND strftime('%Y', start_date) = '{y}';")


def claims_between(r: random.Random, f: Facts) -> tuple[str, str]:
    y = r.choice(f["year"])
    m1 = r.randint(1, 10)
    m2 = r.randint(m1 + 1, 12)
    d1, d2 = f"{y}-{m1:02d}-01", f"{y}-{m2:02d}-28"
    q = r.choice(
        [
            f"How many claims were filed between {d1} and {d2}?",
            f"Count the claims with a claim date from {d1} to {d2} inclusive.",
            f"What is the number of claims made from {d1} through {d2}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM claims WHERE claim_date BETWEEN '{d1}' AND '{d2}';"


def customers_many_policies(r: random.Random, f: Facts) -> tuple[str, str]:
    k, s = r.randint(2, 3), r.choice(f["state"])
    q = r.choice(
        [
            f"How many customers in {s} hold more than {k} policies?",
            f"Count customers from {s} who have over {k} policies.",
            f"What is the number of {s} customers with more than {k} insurance policies?",
        ]
    )
    return q, (
        f"SELECT COUNT(*) FROM (SELECT c.customer_id FROM customers c JOIN policies p "
        f"ON c.customer_id = p.customer_id WHERE c.state = {_q(s)} GROUP BY c.customer_id "
        f"HAVING COUNT(*) > {k});"
    )


def max_claim_type(r: random.Random, f: Facts) -> tuple[str, str]:
    t = r.choice(f["ptype"])
    q = r.choice(
        [
            f"What is the largest amount ever claimed on a {t} policy?",
            f"Find the maximum claimed amount among claims on {t} policies.",
            f"What was the biggest claim amount for {t} insurance?",
        ]
    )
    return q, (
        f"SELECT MAX(c.amount_claimed) FROM claims c JOIN policies p ON c.policy_id = p.policy_id "
        f"WHERE p.policy_type = {_q(t)};"
    )


def payments_method_year(r: random.Random, f: Facts) -> tuple[str, str]:
    m, y = r.choice(f["method"]), r.choice(f["year"])
    q = r.choice(
        [
            f"What was the total of payments made by {m} in {y}?",
            f"Sum all {m} payment amounts in {y}.",
            f"How much was paid via {m} during {y}?",
        ]
    )
    return q, f"SELECT SUM(amount) FROM payments WHERE method = {_q(m)} AND strftime('%Y', payment_date) = '{y}';"


def policies_of_customer(r: random.Random, f: Facts) -> tuple[str, str]:
    first, last = _name(r.choice(f["customer"]))
    q = r.choice(
        [
            f"List the policy ids and types held by {first} {last}.",
            f"Which policies does customer {first} {last} have? Show policy id and type.",
            f"Show policy id and policy type for every policy of {first} {last}.",
        ]
    )
    return q, (
        f"SELECT p.policy_id, p.policy_type FROM policies p JOIN customers c ON p.customer_id = c.customer_id "
        f"WHERE c.first_name = {_q(first)} AND c.last_name = {_q(last)};"
    )


def avg_deductible_cov(r: random.Random, f: Facts) -> tuple[str, str]:
    c = r.choice(f["cov"])
    q = r.choice(
        [
            f"What is the average deductible for {c} coverage?",
            f"Give the mean deductible of {c} coverages.",
            f"On average, how high is the deductible on {c} coverage?",
        ]
    )
    return q, f"SELECT AVG(deductible) FROM coverages WHERE coverage_type = {_q(c)};"


def claims_of_agent(r: random.Random, f: Facts) -> tuple[str, str]:
    first, last = _name(r.choice(f["agent"]))
    s = r.choice(f["cstatus"])
    q = r.choice(
        [
            f"How many {s} claims are on policies sold by agent {first} {last}?",
            f"Count the {s} claims for policies handled by {first} {last}.",
            f"For agent {first} {last}, what is the number of claims with status {s}?",
        ]
    )
    return q, (
        f"SELECT COUNT(*) FROM claims c JOIN policies p ON c.policy_id = p.policy_id JOIN agents a "
        f"ON p.agent_id = a.agent_id WHERE a.first_name = {_q(first)} AND a.last_name = {_q(last)} "
        f"AND c.status = {_q(s)};"
    )


def type_highest_avg_premium(r: random.Random, f: Facts) -> tuple[str, str]:
    s = r.choice(f["state"])
    q = r.choice(
        [
            f"Among customers in {s}, which policy type has the highest average annual premium?",
            f"For {s} customers, what policy type has the largest mean premium?",
            f"Which type of policy is most expensive on average for customers living in {s}?",
        ]
    )
    return q, (
        f"SELECT p.policy_type FROM policies p JOIN customers c ON p.customer_id = c.customer_id "
        f"WHERE c.state = {_q(s)} GROUP BY p.policy_type ORDER BY AVG(p.annual_premium) DESC LIMIT 1;"
    )


def customers_born_before(r: random.Random, f: Facts) -> tuple[str, str]:
    y, s = r.randint(1950, 2000), r.choice(f["state"])
    q = r.choice(
        [
            f"How many customers in {s} were born before {y}?",
            f"Count {s} customers with a birth date earlier than {y}.",
            f"What is the number of customers from {s} born prior to {y}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM customers WHERE state = {_q(s)} AND birth_date < '{y}-01-01';"


def latest_claims(r: random.Random, f: Facts) -> tuple[str, str]:
    n, c = r.randint(3, 10), r.choice(f["ctype"])
    q = r.choice(
        [
            f"Show the {n} most recent {c} claims with their claim id, date and amount claimed.",
            f"List id, date and claimed amount of the latest {n} {c} claims, newest first.",
            f"What are the last {n} {c} claims filed? Give id, date and amount claimed.",
        ]
    )
    return q, (
        f"SELECT claim_id, claim_date, amount_claimed FROM claims WHERE claim_type = {_q(c)} "
        f"ORDER BY claim_date DESC, claim_id DESC LIMIT {n};"
    )


def states_by_customers(r: random.Random, f: Facts) -> tuple[str, str]:
    n = r.randint(2, 6)
    g = r.choice(["F", "M"])
    who = {"F": "female", "M": "male"}[g]
    q = r.choice(
        [
            f"Which {n} states have the most {who} customers? Give the state and the count.",
            f"List the top {n} states by number of {who} customers, with counts.",
            f"Show the {n} states with the largest count of {who} customers and that count.",
        ]
    )
    return q, (
        f"SELECT state, COUNT(*) AS n FROM customers WHERE gender = '{g}' GROUP BY state "
        f"ORDER BY n DESC, state LIMIT {n};"
    )


def paid_in_city(r: random.Random, f: Facts) -> tuple[str, str]:
    c = r.choice(f["city"])
    q = r.choice(
        [
            f"What is the total amount paid out on claims for customers living in {c}?",
            f"Sum the paid amounts of claims by customers from {c}.",
            f"How much has been paid on claims filed by {c} customers in total?",
        ]
    )
    return q, (
        f"SELECT SUM(cl.amount_paid) FROM claims cl JOIN policies p ON cl.policy_id = p.policy_id "
        f"JOIN customers c ON p.customer_id = c.customer_id WHERE c.city = {_q(c)};"
    )


def active_per_region(r: random.Random, f: Facts) -> tuple[str, str]:
    t = r.choice(f["ptype"])
    s = r.choice(f["pstatus"])
    q = r.choice(
        [
            f"For each agent region, how many {s} {t} policies were sold?",
            f"Count {s} {t} policies per region of the selling agent.",
            f"Give the number of {t} policies with status {s} grouped by agent region.",
        ]
    )
    return q, (
        f"SELECT a.region, COUNT(*) FROM policies p JOIN agents a ON p.agent_id = a.agent_id "
        f"WHERE p.policy_type = {_q(t)} AND p.status = {_q(s)} GROUP BY a.region;"
    )


def payments_in_month(r: random.Random, f: Facts) -> tuple[str, str]:
    y, m = r.choice(f["year"]), r.randint(1, 12)
    q = r.choice(
        [
            f"How many payments were received in {MONTHS[m - 1]} {y}?",
            f"Count the payments dated in {MONTHS[m - 1]} of {y}.",
            f"What number of payments were made during {MONTHS[m - 1]} {y}?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM payments WHERE strftime('%Y-%m', payment_date) = '{y}-{m:02d}';"


def customers_without_email(r: random.Random, f: Facts) -> tuple[str, str]:
    c = r.choice(f["city"])
    q = r.choice(
        [
            f"Which customers in {c} have no email address? Give their customer ids.",
            f"List ids of {c} customers whose email is missing.",
            f"Show the customer id of every customer from {c} without an email.",
        ]
    )
    return q, f"SELECT customer_id FROM customers WHERE city = {_q(c)} AND email IS NULL;"


def coverage_limit_over(r: random.Random, f: Facts) -> tuple[str, str]:
    c, x = r.choice(f["cov"]), r.choice((10000, 25000, 50000, 100000, 250000))
    q = r.choice(
        [
            f"How many {c} coverages have a limit above {x}?",
            f"Count {c} coverages whose limit amount is greater than {x}.",
            f"What is the number of {c} coverages with limits over {x} dollars?",
        ]
    )
    return q, f"SELECT COUNT(*) FROM coverages WHERE coverage_type = {_q(c)} AND limit_amount > {x};"


def denial_rate_type(r: random.Random, f: Facts) -> tuple[str, str]:
    c = r.choice(f["ctype"])
    q = r.choice(
        [
            f"What fraction of {c} claims were denied?",
            f"Give the share of {c} claims whose status is denied.",
            f"What proportion of claims of type {c} got denied?",
        ]
    )
    return q, (f"SELECT AVG(CASE WHEN status = 'denied' THEN 1.0 ELSE 0.0 END) FROM claims WHERE claim_type = {_q(c)};")


TEMPLATES: dict[str, Template] = {
    fn.__name__: fn
    for fn in (
        count_customers_state,
        list_customers_city,
        count_policies_type_status,
        avg_premium_type,
        total_claimed_type_year,
        claims_per_status,
        top_customers_premium,
        agents_region_commission,
        policies_started_year,
        claims_between,
        customers_many_policies,
        max_claim_type,
        payments_method_year,
        policies_of_customer,
        avg_deductible_cov,
        claims_of_agent,
        type_highest_avg_premium,
        customers_born_before,
        latest_claims,
        states_by_customers,
        paid_in_city,
        active_per_region,
        payments_in_month,
        customers_without_email,
        coverage_limit_over,
        denial_rate_type,
    )
}


def generate_pairs(conn: sqlite3.Connection, n: int, seed: int = 0) -> list[Pair]:
    """``n`` distinct pairs, intents in turn, each gold executed once (a failing gold raises)."""
    rng = random.Random(seed)
    f = facts(conn)
    seen: set[str] = set()
    pairs: list[Pair] = []
    names = list(TEMPLATES)
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"only {len(pairs)} distinct questions after {attempts} draws")
        intent = names[attempts % len(names)]
        question, sql = TEMPLATES[intent](rng, f)
        if question in seen:
            continue
        conn.execute(sql).fetchmany(1)  # a gold that does not run is a bug in its template
        seen.add(question)
        pairs.append(Pair(question, sql, intent))
    return pairs
