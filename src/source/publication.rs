//! The publication kept in step with the config, in one place for `walhook setup`,
//! start-up, live reload and `walhook check`: read what it publishes, compare with the
//! watched tables, and apply the one statement that makes them equal in a transaction
//! that ends as the caller needs ([`Ending`]). A role that may not change it gets
//! [`SourceError::PublicationNeedsDba`] with the SQL a DBA must run.

use tokio_postgres::Client;

use super::SourceError;
use crate::pg::{TableName, quote_ident};

/// SQLSTATEs of a publication change the role may not make: 42501 (must be owner of
/// the table or the publication) and 42710 (the publication exists, owned by another).
const REFUSED: [&str; 2] = ["42501", "42710"];

/// What [`Publication::apply`] did (or, rolled back, would do).
#[derive(Debug, PartialEq, Eq)]
pub enum PublicationChange {
    Unchanged,
    Created,
    Altered,
}

/// How the transaction that changes the publication ends.
pub enum Ending<'a> {
    /// Commit the change.
    Commit,
    /// Run [`HandOver::hand_over`] just before COMMIT (and also when nothing needs
    /// changing), then commit; when COMMIT fails, [`HandOver::take_back`] undoes it.
    /// Live reload hands its new rules to the source task this way, so that every
    /// source transaction committed after the change is mapped by them.
    CommitWith(&'a mut (dyn HandOver + Send)),
    /// Roll the change back (`walhook check`: could `walhook run` make it?).
    RollBack,
}

/// Work that must happen exactly when the publication change commits.
pub trait HandOver {
    /// Runs just before COMMIT, or at once when the publication already matches.
    fn hand_over(&mut self);
    /// Undoes [`HandOver::hand_over`] after a failed COMMIT.
    fn take_back(&mut self);
}

/// The plan for publication `name`: what it publishes now and what it should publish.
#[derive(Clone, Debug)]
pub struct Publication {
    name: String,
    /// The watched tables, sorted, each once.
    wanted: Vec<TableName>,
    /// The tables it publishes now (sorted), or `None` when it does not exist.
    current: Option<Vec<TableName>>,
}

impl Publication {
    /// A plan from known state: `tables` are the watched tables (any order, repeats
    /// allowed), `current` what the publication publishes now (`None`: it does not exist).
    pub fn plan(name: &str, tables: &[TableName], current: Option<Vec<TableName>>) -> Self {
        let mut wanted = tables.to_vec();
        wanted.sort();
        wanted.dedup();
        let current = current.map(|mut c| {
            c.sort();
            c
        });
        Publication {
            name: name.to_owned(),
            wanted,
            current,
        }
    }

    /// Reads what publication `name` publishes now and plans to make it publish `tables`.
    pub async fn read(
        client: &Client,
        name: &str,
        tables: &[TableName],
    ) -> Result<Self, SourceError> {
        let current = published_tables(client, name).await?;
        Ok(Self::plan(name, tables, current))
    }

    /// Whether the publication exists.
    pub fn exists(&self) -> bool {
        self.current.is_some()
    }

    /// What applying the plan changes.
    pub fn change(&self) -> PublicationChange {
        match &self.current {
            Some(current) if *current == self.wanted => PublicationChange::Unchanged,
            Some(_) => PublicationChange::Altered,
            None => PublicationChange::Created,
        }
    }

    /// The statement that makes the publication publish the watched tables, or `None`
    /// when it already does.
    pub fn sql(&self) -> Option<String> {
        (self.change() != PublicationChange::Unchanged)
            .then(|| publication_sql(&self.name, &self.wanted, self.exists()))
    }

    /// Applies the plan in one transaction that ends as `ending` says. A change the
    /// role may not make is [`SourceError::PublicationNeedsDba`]; then nothing changed
    /// and no [`HandOver`] ran (or it was taken back).
    pub async fn apply(
        &self,
        client: &Client,
        ending: Ending<'_>,
    ) -> Result<PublicationChange, SourceError> {
        let Some(statement) = self.sql() else {
            if let Ending::CommitWith(hand_over) = ending {
                hand_over.hand_over();
            }
            return Ok(PublicationChange::Unchanged);
        };
        client.batch_execute("BEGIN").await?;
        if let Err(e) = client.batch_execute(&statement).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(self.refusal(client, statement, e).await);
        }
        match ending {
            Ending::Commit => client.batch_execute("COMMIT").await?,
            Ending::CommitWith(hand_over) => {
                hand_over.hand_over();
                if let Err(e) = client.batch_execute("COMMIT").await {
                    hand_over.take_back();
                    return Err(e.into());
                }
            }
            Ending::RollBack => client.batch_execute("ROLLBACK").await?,
        }
        Ok(self.change())
    }

    /// The error of a failed change: a refused privilege names the SQL a DBA must run;
    /// other errors pass through.
    async fn refusal(
        &self,
        client: &Client,
        statement: String,
        e: tokio_postgres::Error,
    ) -> SourceError {
        if !e.code().is_some_and(|c| REFUSED.contains(&c.code())) {
            return e.into();
        }
        let role: String = match client.query_one("SELECT current_user::text", &[]).await {
            Ok(row) => row.get(0),
            Err(e) => return e.into(),
        };
        SourceError::PublicationNeedsDba {
            name: self.name.clone(),
            role,
            reason: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default(),
            sql: statement,
        }
    }
}

/// The SQL that makes publication `name` publish exactly `tables`, in the order given
/// (`walhook setup --print-sql` prints the config's order).
pub fn publication_sql(name: &str, tables: &[TableName], exists: bool) -> String {
    let list = tables
        .iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    if exists {
        format!("ALTER PUBLICATION {} SET TABLE {list};", quote_ident(name))
    } else {
        format!("CREATE PUBLICATION {} FOR TABLE {list};", quote_ident(name))
    }
}

/// The tables publication `name` publishes now (sorted), or `None` when it does not exist.
pub async fn published_tables(
    client: &Client,
    name: &str,
) -> Result<Option<Vec<TableName>>, SourceError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    let mut tables: Vec<TableName> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    tables.sort();
    Ok(Some(tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName {
            schema: "public".into(),
            name: name.into(),
        }
    }

    #[test]
    fn publication_sql_quotes_every_name() {
        let t = [t("user roles")];
        assert_eq!(
            publication_sql("walhook", &t, false),
            "CREATE PUBLICATION \"walhook\" FOR TABLE \"public\".\"user roles\";"
        );
        assert!(
            publication_sql("walhook", &t, true)
                .starts_with("ALTER PUBLICATION \"walhook\" SET TABLE")
        );
    }

    #[test]
    fn a_missing_publication_is_created_with_the_sorted_deduplicated_tables() {
        let plan = Publication::plan("walhook", &[t("users"), t("orgs"), t("users")], None);
        assert_eq!(plan.change(), PublicationChange::Created);
        assert_eq!(
            plan.sql().as_deref(),
            Some(
                "CREATE PUBLICATION \"walhook\" FOR TABLE \"public\".\"orgs\", \"public\".\"users\";"
            )
        );
    }

    #[test]
    fn the_same_tables_in_another_order_need_nothing() {
        let plan = Publication::plan(
            "walhook",
            &[t("users"), t("orgs"), t("orgs")],
            Some(vec![t("users"), t("orgs")]),
        );
        assert_eq!(plan.change(), PublicationChange::Unchanged);
        assert_eq!(plan.sql(), None);
    }

    #[test]
    fn other_tables_are_altered_to_exactly_the_watched_ones() {
        for current in [
            vec![t("users")],
            vec![t("orgs"), t("users"), t("old")],
            vec![],
        ] {
            let plan = Publication::plan("walhook", &[t("users"), t("orgs")], Some(current));
            assert_eq!(plan.change(), PublicationChange::Altered);
            assert_eq!(
                plan.sql().as_deref(),
                Some(
                    "ALTER PUBLICATION \"walhook\" SET TABLE \"public\".\"orgs\", \"public\".\"users\";"
                )
            );
        }
    }
}
