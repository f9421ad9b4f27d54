-- Feedback on a scorecard's predictions (docs/churn.md): a customer-success manager who
-- closes a churn-risk task as a false positive leaves a label here (the
-- `score_feedback` action of the feedback workflow writes it), and `crmflow score fit`
-- reads the labels of the accounts it learns from. One row per verdict; the latest one
-- per (scorecard, entity) is the one that counts.
CREATE TABLE crmflow.score_feedback (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scorecard text NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    label text NOT NULL CHECK (label IN ('false_positive', 'true_positive')),
    -- The score and level the entity had when the verdict was given.
    score double precision,
    level text,
    -- Where the verdict came from ("task:42") and who gave it.
    source text,
    note text,
    execution_id bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX score_feedback_entity_idx
    ON crmflow.score_feedback (scorecard, entity_type, entity_id, created_at DESC);
