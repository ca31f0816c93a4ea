//! What the demo does to its database: the identity-service schema, the walhook config
//! that watches it, and the scripted changes with the events each one must produce.

/// The demo database's schema. `roles` is reference data and not watched.
pub const SCHEMA: &str = "
CREATE TABLE organisations (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL,
    plan       text NOT NULL DEFAULT 'free',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id        bigint NOT NULL REFERENCES organisations (id),
    email         text NOT NULL UNIQUE,
    name          text NOT NULL,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    password_hash text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- The user.suspended rule compares old and new status: PostgreSQL sends the old row
-- only with REPLICA IDENTITY FULL.
ALTER TABLE users REPLICA IDENTITY FULL;
CREATE TABLE roles (
    id   int PRIMARY KEY,
    name text NOT NULL UNIQUE
);
INSERT INTO roles VALUES (1, 'member'), (2, 'admin'), (3, 'billing');
CREATE TABLE user_roles (
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_id    int NOT NULL REFERENCES roles (id),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, role_id)
);
";

/// The walhook config of the demo, with the database URL, the receiver URL and the
/// signing secret filled in. It goes through the same loading and validation as a file.
pub fn config_toml(db_url: &str, receiver_url: &str, secret: &str) -> String {
    format!(
        r#"
[source]
url = "{db_url}"
slot = "walhook_demo"
publication = "walhook_demo"

[server]
listen = "127.0.0.1:0"

[log]
level = "warn"

[daemon]
shutdown_grace = "2s"

[[tables]]
table = "public.organisations"
entity = "organisation"

[[tables]]
table = "public.users"
entity = "user"
exclude_columns = ["password_hash"]

[[tables.rules]]
event = "user.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"

[[tables]]
table = "public.user_roles"
entity = "user"
id = ["user_id"]
events = {{ insert = "role.assigned", delete = "role.unassigned", update = false }}

[[subscriptions]]
name = "demo"
description = "the demo's embedded receiver"
url = "{receiver_url}"
events = ["*"]
secret = "{secret}"
timeout = "5s"

[subscriptions.retry]
backoff = ["1s"]
max_age = "1h"
"#
    )
}

/// One scripted change and the events it must produce (in any order; events of one
/// row change share a revision).
pub struct Step {
    /// What happens, in words.
    pub title: &'static str,
    /// The SQL (one implicit transaction).
    pub sql: &'static str,
    /// `(type, entity:id, revision)` of each webhook it produces.
    pub expect: &'static [(&'static str, &'static str, i64)],
}

/// The scripted changes, in order.
pub const STEPS: &[Step] = &[
    Step {
        title: "Acme signs up",
        sql: "INSERT INTO organisations (name, plan) VALUES ('Acme', 'team')",
        expect: &[("organisation.created", "organisation:1", 1)],
    },
    Step {
        title: "Ada signs up",
        sql: "INSERT INTO users (org_id, email, name, password_hash) \
              VALUES (1, 'ada@acme.example', 'Ada Lovelace', '$argon2id$v=19$m=65536$c2VjcmV0')",
        expect: &[("user.created", "user:1", 1)],
    },
    Step {
        title: "Ada changes her email",
        sql: "UPDATE users SET email = 'ada.lovelace@acme.example' WHERE id = 1",
        expect: &[("user.updated", "user:1", 2)],
    },
    Step {
        title: "Ada becomes an admin",
        sql: "INSERT INTO user_roles (user_id, role_id) VALUES (1, 2)",
        expect: &[("user.role.assigned", "user:1", 3)],
    },
    Step {
        title: "Ada is suspended (a derived event: status active -> suspended)",
        sql: "UPDATE users SET status = 'suspended' WHERE id = 1",
        expect: &[
            ("user.updated", "user:1", 4),
            ("user.suspended", "user:1", 4),
        ],
    },
    Step {
        title: "Ada is deleted, her role first (one transaction)",
        sql: "DELETE FROM user_roles WHERE user_id = 1; DELETE FROM users WHERE id = 1",
        expect: &[
            ("user.role.unassigned", "user:1", 5),
            ("user.deleted", "user:1", 6),
        ],
    },
];
