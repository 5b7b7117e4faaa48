-- PostgreSQL side of loadtest/compare: the gateway's authorization as one
-- transaction, so that the comparison is with the obvious alternative design
-- (a relational database holding card state, deny list and journal).
-- Run with: psql -v cards=N -f pg-schema.sql
\set ON_ERROR_STOP on

CREATE TABLE cards (
    card_no       text PRIMARY KEY,
    status        text   NOT NULL,            -- active | lost | frozen | cancelled
    functions     text[] NOT NULL,            -- transit, medical, financial
    spent_day     date,                       -- local day (+08:00) spent_fen counts for
    spent_fen     bigint NOT NULL DEFAULT 0,
    daily_cap_fen bigint NOT NULL
);

CREATE TABLE denylist (
    card_no text PRIMARY KEY,
    reason  text NOT NULL
);

-- The journal doubles as the idempotency store: a repeated
-- (terminal, event_id) hits the unique key and gets the first answer back.
CREATE TABLE journal (
    seq        bigserial PRIMARY KEY,
    terminal   text        NOT NULL,
    event_id   text        NOT NULL,
    card_no    text        NOT NULL,
    decision   text        NOT NULL,
    reason     text        NOT NULL,
    amount_fen int         NOT NULL,
    at         timestamptz NOT NULL,
    UNIQUE (terminal, event_id)
);

-- One authorization, in the gateway's order (src/authz.rs): deny list, card
-- exists, status, the scenario's function, per-transaction maximum, daily cap.
-- Called as a single autocommit statement, it is one transaction: the answer
-- comes back only after COMMIT has flushed (fdatasync'ed) its WAL record,
-- like the gateway's durability = "sync".
CREATE FUNCTION authorize(
    p_terminal text, p_event_id text, p_card_no text, p_scenario text, p_amount_fen int,
    OUT decision text, OUT reason text, OUT amount_fen int)
LANGUAGE plpgsql AS $$
DECLARE
    c            cards%ROWTYPE;
    v_function   text;
    v_charges    boolean;
    v_amount_max bigint;
    v_day        date := timezone(interval '+08:00', now())::date;
    v_seq        bigint;
BEGIN
    -- The gateway's built-in scenario rules (config::scenario_default).
    CASE p_scenario
        WHEN 'transit' THEN v_function := 'transit';   v_charges := true;  v_amount_max := 2000;
        WHEN 'medical' THEN v_function := 'medical';   v_charges := true;  v_amount_max := 500000;
        WHEN 'payment' THEN v_function := 'financial'; v_charges := true;  v_amount_max := 200000;
        WHEN 'culture' THEN v_function := NULL;        v_charges := true;  v_amount_max := 20000;
        ELSE                v_function := NULL;        v_charges := false; v_amount_max := 0;
    END CASE;

    amount_fen := 0;
    IF EXISTS (SELECT 1 FROM denylist d WHERE d.card_no = p_card_no) THEN
        reason := 'DENYLISTED';
    ELSE
        -- The row lock serializes taps of one card, as the gateway's per-card
        -- ordering does, so two taps cannot both fit under the daily cap.
        SELECT * INTO c FROM cards WHERE cards.card_no = p_card_no FOR UPDATE;
        IF NOT FOUND THEN
            reason := 'CARD_NOT_FOUND';
        ELSIF c.status <> 'active' THEN
            reason := 'CARD_' || upper(c.status);
        ELSIF v_function IS NOT NULL AND NOT (v_function = ANY (c.functions)) THEN
            reason := 'FUNCTION_NOT_ENABLED';
        ELSIF NOT v_charges OR p_amount_fen = 0 THEN
            reason := 'OK';
        ELSIF p_amount_fen > v_amount_max
           OR (CASE WHEN c.spent_day = v_day THEN c.spent_fen ELSE 0 END) + p_amount_fen > c.daily_cap_fen THEN
            reason := 'LIMIT_EXCEEDED';
        ELSE
            reason := 'OK';
            amount_fen := p_amount_fen;
        END IF;
    END IF;
    decision := CASE WHEN reason = 'OK' THEN 'approve' ELSE 'decline' END;

    INSERT INTO journal (terminal, event_id, card_no, decision, reason, amount_fen, at)
    VALUES (p_terminal, p_event_id, p_card_no, decision, reason, amount_fen, now())
    ON CONFLICT (terminal, event_id) DO NOTHING
    RETURNING seq INTO v_seq;
    IF v_seq IS NULL THEN
        -- A repeat of an event already answered: the first answer stands and
        -- nothing is charged twice.
        SELECT j.decision, j.reason, j.amount_fen INTO decision, reason, amount_fen
          FROM journal j WHERE j.terminal = p_terminal AND j.event_id = p_event_id;
        RETURN;
    END IF;

    IF amount_fen > 0 THEN
        UPDATE cards
           SET spent_fen = CASE WHEN spent_day = v_day THEN spent_fen ELSE 0 END + amount_fen,
               spent_day = v_day
         WHERE cards.card_no = p_card_no;
    END IF;
END
$$;

-- The gateway run's cards: 500118B00000000 onwards, active, every function,
-- the default daily cap; every hundredth (…07, …107, …) deny-listed.
INSERT INTO cards (card_no, status, functions, spent_day, spent_fen, daily_cap_fen)
SELECT '500118B' || lpad(i::text, 8, '0'), 'active', ARRAY['transit', 'medical', 'financial'], NULL, 0, 100000
  FROM generate_series(0, :cards - 1) AS i;
INSERT INTO denylist (card_no, reason)
SELECT '500118B' || lpad(i::text, 8, '0'), 'lost'
  FROM generate_series(7, :cards - 1, 100) AS i;

VACUUM ANALYZE;
-- Start the run with nothing left to write back.
CHECKPOINT;
