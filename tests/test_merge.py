"""The catch-up merge rules, case by case and by property: what PostgreSQL must hold for a
session given base, live and PostgreSQL's row before the pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sessionmig.rules.merge import (
    BEFORE_BASE,
    CHANGED,
    ENDED,
    INSERTED,
    NOTHING,
    RECREATED,
    STAYS_ENDED,
    UNCHANGED,
    Conflict,
    created_before_base,
    describe_going_back,
    going_back,
    merge,
    saturated,
    went_back,
)
from sessionmig.rules.transform import INT4_MAX

T0 = datetime(2026, 1, 15, 3, tzinfo=UTC)
H = timedelta(hours=1)


def row(
    sid: str = "s1",
    user: str | None = "u1",
    meta: str | None = '{"a": 1}',
    created: datetime = T0,
    expires: datetime = T0 + 24 * H,
    last: datetime = T0,
    count: int = 0,
) -> tuple:
    return (sid, user, meta, created, expires, last, count)


def with_(r: tuple, **changes) -> tuple:
    names = ("sid", "user", "meta", "created", "expires", "last", "count")
    values = dict(zip(names, r, strict=True))
    values.update(changes)
    return row(**values)


# --- case by case ----------------------------------------------------------------------------


def test_unchanged_in_live_leaves_postgres_exactly_as_it_is() -> None:
    base = row(count=3)
    target = with_(base, count=9, last=T0 + 2 * H, meta='{"b": 2}')
    outcome = merge(base, base, target)
    assert outcome.kind == UNCHANGED and outcome.row == target and outcome.conflicts == ()


def test_created_in_live_is_inserted_as_live_has_it() -> None:
    live = row("new", count=2)
    assert merge(None, live, None).kind == INSERTED
    assert merge(None, live, None).row == live


def test_created_in_live_that_postgres_already_has_merges_without_ancestor() -> None:
    live = row("s", count=5, last=T0 + H, expires=T0 + 30 * H, user="u-live")
    target = row("s", count=7, last=T0 + 2 * H, expires=T0 + 25 * H, user="u-pg")
    outcome = merge(None, live, target)
    assert outcome.kind == CHANGED
    # Counts take the larger (never added twice), instants the later, a differing user_id is
    # a conflict that PostgreSQL's newer last_activity wins.
    assert outcome.row == row(
        "s", count=7, last=T0 + 2 * H, expires=T0 + 30 * H, user="u-pg", meta='{"a": 1}'
    )
    assert outcome.conflicts == (Conflict("user_id", "postgres"),)


def test_changes_in_live_go_on_top_of_postgres() -> None:
    base = row(count=3, last=T0 + H, expires=T0 + 24 * H)
    live = with_(base, count=5, last=T0 + 3 * H, expires=T0 + 48 * H)
    # PostgreSQL validated the session 4 times meanwhile and changed metadata.
    target = with_(base, count=7, last=T0 + 2 * H, meta='{"pg": true}')
    outcome = merge(base, live, target)
    assert outcome.kind == CHANGED and outcome.conflicts == ()
    assert outcome.row == with_(
        base, count=7 + 2, last=T0 + 3 * H, expires=T0 + 48 * H, meta='{"pg": true}'
    )


def test_instants_never_go_back() -> None:
    base = row(last=T0, expires=T0 + 24 * H)
    live = with_(base, last=T0 + H, expires=T0 + 25 * H)
    target = with_(base, last=T0 + 5 * H, expires=T0 + 72 * H)
    assert merge(base, live, target).row == target


def test_a_column_changed_only_in_postgres_is_never_touched() -> None:
    base = row(user="u1", meta=None, count=1)
    live = with_(base, count=2)  # a validation on the old colour
    target = with_(base, user="u2", meta='{"x": 1}', expires=T0 + 2 * H)
    outcome = merge(base, live, target)
    assert outcome.row == with_(target, count=2)
    # expires_at went *down* in PostgreSQL (an admin shortened it); live did not touch it.
    assert outcome.row[4] == T0 + 2 * H


def test_changed_only_in_live_takes_live() -> None:
    base = row(user=None, meta='{"a": 1}')
    live = with_(base, user="u9", meta='{"a": 2}', created=T0 - H)
    target = with_(base, count=4)
    assert merge(base, live, target).row == with_(live, count=4)


def test_same_change_on_both_sides_is_no_conflict() -> None:
    base = row(meta='{"a": 1}')
    live = with_(base, meta='{"a": 2}', last=T0 + H)
    target = with_(base, meta='{"a": 2}', last=T0 + 2 * H)
    outcome = merge(base, live, target)
    assert outcome.conflicts == () and outcome.row[2] == '{"a": 2}'


def test_conflict_newer_last_activity_wins_and_is_named() -> None:
    base = row(user="u1", meta='{"v": 0}')
    live = with_(base, user="u-live", meta='{"v": 1}', last=T0 + 3 * H)
    older_pg = with_(base, user="u-pg", meta='{"v": 2}', last=T0 + 2 * H)
    newer_pg = with_(older_pg, last=T0 + 4 * H)
    won_by_live = merge(base, live, older_pg)
    assert won_by_live.row[1:3] == ("u-live", '{"v": 1}')
    assert won_by_live.conflicts == (
        Conflict("user_id", "live"),
        Conflict("metadata", "live"),
    )
    won_by_pg = merge(base, live, newer_pg)
    assert won_by_pg.row[1:3] == ("u-pg", '{"v": 2}')
    assert {c.winner for c in won_by_pg.conflicts} == {"postgres"}
    # A tie keeps PostgreSQL's: the colour that now serves.
    tie = merge(base, live, with_(older_pg, last=T0 + 3 * H))
    assert tie.row[1] == "u-pg" and tie.conflicts[0].winner == "postgres"


def test_null_versus_json_null_is_a_change() -> None:
    base = row(meta=None)
    live = with_(base, meta="null")
    assert merge(base, live, base).row[2] == "null"


def test_ended_in_live_is_ended_in_postgres_whatever_postgres_did() -> None:
    base = row(count=1)
    target = with_(base, count=50, last=T0 + 9 * H, meta='{"busy": true}')
    assert merge(base, None, target).kind == ENDED
    assert merge(base, None, target).row is None
    assert merge(base, None, None).kind == STAYS_ENDED


def test_ended_in_postgres_stays_ended_when_live_changed_it() -> None:
    base = row(count=1)
    live = with_(base, count=2, last=T0 + H)
    outcome = merge(base, live, None)
    assert outcome.kind == STAYS_ENDED and outcome.row is None


def test_in_neither_snapshot_is_postgres_business_alone() -> None:
    target = row("pg-only", count=3)
    assert merge(None, None, target).kind == NOTHING
    assert merge(None, None, target).row == target


def test_counts_saturate_at_integer() -> None:
    base = row(count=0)
    live = with_(base, count=10)
    assert merge(base, live, with_(base, count=INT4_MAX - 3)).row[6] == INT4_MAX
    assert saturated(-(2**40)) == -(2**31)


# --- properties ------------------------------------------------------------------------------

users = st.sampled_from([None, "", "u1", "u2", "u3"])
metas = st.sampled_from([None, "null", '{"a": 1}', '{"a": 2}', "[1, 2]"])
instants = st.integers(0, 200).map(lambda h: T0 + h * H)
counts = st.integers(0, 1000)


@st.composite
def rows(draw, sid: str = "s") -> tuple:
    return row(sid, draw(users), draw(metas), draw(instants), draw(instants), draw(instants),
               draw(counts))  # fmt: skip


@st.composite
def forward(draw, base: tuple) -> tuple:
    """What the old colour may do to a session it keeps: more requests, later instants, new
    values; never another created_at (a later one is a new session under the same id:
    :func:`recreate`)."""
    return (
        base[0],
        draw(st.one_of(st.just(base[1]), users)),
        draw(st.one_of(st.just(base[2]), metas)),
        base[3],
        base[4] + draw(st.integers(0, 48)) * H,
        base[5] + draw(st.integers(0, 48)) * H,
        base[6] + draw(st.integers(0, 50)),
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_requests_counted_on_both_colours_add_up(data) -> None:
    base = data.draw(rows())
    live = data.draw(forward(base))
    pg_validations = data.draw(st.integers(0, 50))
    target = with_(base, count=base[6] + pg_validations)
    result = merge(base, live, target).row
    assert result is not None
    assert result[6] == base[6] + (live[6] - base[6]) + pg_validations


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_pass_commutes_with_the_apps_increments(data) -> None:
    """A validation on PostgreSQL just before or just after the pass counts the same."""
    base = data.draw(rows())
    live = data.draw(forward(base))
    target = data.draw(forward(base))
    bumped_first = merge(base, live, with_(target, count=target[6] + 1)).row
    bumped_after = merge(base, live, target).row
    assert bumped_first is not None and bumped_after is not None
    assert bumped_first[6] == bumped_after[6] + 1
    assert bumped_first[:6] == bumped_after[:6]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_passes_compose(data) -> None:
    """Carrying the old colour's changes in two passes gives the counts and instants of one."""
    base = data.draw(rows())
    middle = data.draw(forward(base))
    live = data.draw(forward(middle))
    target = data.draw(forward(base))
    once = merge(base, live, target).row
    first = merge(base, middle, target).row
    assert first is not None
    twice = merge(middle, live, first).row
    assert once is not None and twice is not None
    assert (twice[4], twice[5], twice[6]) == (once[4], once[5], once[6])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_postgres_only_changes_survive_and_live_changes_arrive(data) -> None:
    base = data.draw(rows())
    live = data.draw(forward(base))
    target = data.draw(forward(base))
    outcome = merge(base, live, target)
    result = outcome.row
    assert result is not None
    conflicted = {c.column for c in outcome.conflicts}
    for i, column in ((1, "user_id"), (2, "metadata"), (3, "created_at")):
        if live[i] == base[i]:
            assert result[i] == target[i]  # only PostgreSQL changed it (or nobody)
        elif target[i] == base[i]:
            assert result[i] == live[i]  # only live changed it
        elif live[i] != target[i]:
            assert column in conflicted
            assert result[i] == (live[i] if live[5] > target[5] else target[i])
        else:
            assert result[i] == live[i] == target[i] and column not in conflicted
    for i in (4, 5):
        assert result[i] == (target[i] if live[i] == base[i] else max(target[i], live[i]))
        assert result[i] >= target[i]  # instants never go back


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_no_change_in_live_means_no_change(data) -> None:
    base = data.draw(rows())
    target = data.draw(st.one_of(st.none(), rows()))
    assert merge(base, base, target).row == target


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_token_ended_anywhere_stays_ended(data) -> None:
    base = data.draw(rows())
    live = data.draw(st.one_of(st.none(), forward(base)))
    target = data.draw(st.one_of(st.none(), forward(base)))
    outcome = merge(base, live, target)
    if live is None or target is None:
        assert outcome.row is None


# --- a live side that is not a later state of the base ---------------------------------------


def test_what_the_app_does_never_goes_back() -> None:
    base = row(count=4, last=T0 + H)
    validated = with_(base, count=5, last=T0 + 2 * H)
    extended = with_(base, expires=T0 + 48 * H)
    shortened = with_(base, expires=T0 + 2 * H)  # an extension by fewer hours than were left
    moved_user = with_(base, user="u2", meta='{"b": 2}')
    for live in (base, validated, extended, shortened, moved_user, None):
        assert went_back(base, live) == ()
    assert went_back(None, validated) == ()  # created: nothing to go back from


def test_a_count_down_or_another_creation_time_is_going_back() -> None:
    base = row(count=4)
    assert went_back(base, with_(base, count=3)) == ("request_count",)
    assert went_back(base, with_(base, created=T0 - H)) == ("created_at",)
    assert went_back(base, with_(base, count=0, created=T0 - H)) == (
        "request_count",
        "created_at",
    )
    # A later created_at with the count back at 0 is a new session under the same id:
    # carried as recreated, never a sign of another store.
    assert went_back(base, with_(base, count=0, created=T0 + H)) == ()
    # A clock set back on the old colour's host moves last_activity back: the merge takes the
    # later one anyway, so that alone is no sign of another store.
    assert went_back(base, with_(base, last=T0 - H, count=5)) == ()


def test_going_back_counts_per_column_with_the_first_session() -> None:
    b1, b2, b3 = row("s1", count=2), row("s2", count=9), row("s3", count=1)
    found = going_back(
        [
            ("s1", b1, with_(b1, count=1)),
            ("s2", b2, with_(b2, count=0, created=T0 - H)),
            ("s3", b3, with_(b3, count=2)),  # up: fine
            ("s4", None, row("s4")),
            ("s5", row("s5"), None),
        ]
    )
    assert found == {"request_count": (2, "s1"), "created_at": (1, "s2")}
    text = describe_going_back(found)
    assert "request_count went back in 2 sessions" in text
    assert "created_at went back in 1 session (" in text
    assert "s1" not in text.replace("sessions", "")  # ids are bearer tokens: masked


@settings(max_examples=200)
@given(
    count=st.integers(0, INT4_MAX - 100),
    validations=st.integers(0, 50),
    extend_hours=st.integers(-10, 100),
    later=st.integers(0, 1000),
)
def test_any_sequence_of_app_operations_is_not_going_back(
    count: int, validations: int, extend_hours: int, later: int
) -> None:
    base = row(count=count)
    live = with_(
        base,
        count=count + validations,
        last=T0 + later * timedelta(seconds=1),
        expires=T0 + later * timedelta(seconds=1) + extend_hours * H,
    )
    assert went_back(base, live) == ()


def test_sessions_new_in_live_but_created_before_the_base_was_taken() -> None:
    margin, now = timedelta(minutes=10), T0 + 100 * H
    ended = row("old", created=T0, last=T0 + 5 * H)  # the base was taken after T0 + 5 h
    fresh = row("fresh", created=T0 + 5 * H - 5 * timedelta(minutes=1))  # within the margin
    foreign = row("foreign", created=T0 + 2 * H)
    assert created_before_base([("old", ended, None), ("fresh", None, fresh)], margin, now) is None
    pairs = [("old", ended, None), ("fresh", None, fresh), ("foreign", None, foreign)]
    assert created_before_base(pairs, margin, now) == (1, "foreign")
    # Nothing of the base among the pairs: no bound, nothing to say.
    assert created_before_base([("foreign", None, foreign)], margin, now) is None
    # A base instant after now is odd data, not a bound: it would refuse every new session.
    odd = row("odd", created=T0, last=T0 + 10_000 * H)
    assert created_before_base([("odd", odd, None), ("fresh", None, fresh)], margin, now) is None
    found = {BEFORE_BASE: created_before_base(pairs, margin, now)}
    assert "1 session created before the base was taken, not in it" in describe_going_back(found)


@st.composite
def recreate(draw, base: tuple) -> tuple:
    """The old colour ended the session and created a new one under its id, later."""
    created = base[3] + draw(st.integers(1, 48)) * H
    return row(base[0], draw(users), draw(metas), created, created + 24 * H, created,
               draw(st.integers(0, 5)))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_session_recreated_under_its_id_is_carried_as_the_new_one(data) -> None:
    """A recreated id is neither refused nor merged into the old session:
    PostgreSQL ends up holding the new session exactly, whatever it did to the old one."""
    base = data.draw(rows())
    live = data.draw(recreate(base))
    target = data.draw(st.one_of(st.none(), forward(base)))
    assert went_back(base, live) == ()
    assert going_back([("s", base, live)]) == {}
    outcome = merge(base, live, target)
    assert outcome.kind == RECREATED and outcome.row == live


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_an_older_created_at_is_still_refused(data) -> None:
    """The wrong-file refusals hold: a created_at earlier than the base's is a restored copy or
    another store, never a recreation."""
    live = data.draw(rows())
    base = with_(live, created=live[3] + data.draw(st.integers(1, 48)) * H)
    assert "created_at" in went_back(base, live)
