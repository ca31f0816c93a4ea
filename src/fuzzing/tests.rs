//! The fuzz targets without cargo-fuzz: every committed corpus file is replayed, then a
//! seeded mutation loop runs for a few seconds per target. A panicking input is written
//! to a file named in the failure, to add to the corpus once fixed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{config, frame_stream, pgoutput_message, pgoutput_stream, split_stream};

/// How long each mutation loop runs at most.
const MUTATION_BUDGET: Duration = Duration::from_secs(5);
/// How many inputs each mutation loop tries at most.
const MUTATION_ROUNDS: usize = 200_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every file of a target's committed corpus, by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                data,
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

/// Runs `body` on `input`; on a panic, saves the input and fails naming the file.
fn run_one<T>(target: &str, what: &str, body: fn(&[u8]) -> T, input: &[u8]) -> T {
    let result = catch_unwind(AssertUnwindSafe(|| body(input)));
    let Ok(out) = result else {
        let path = std::env::temp_dir().join(format!(
            "walhook-fuzz-{target}-crash-{}",
            std::process::id()
        ));
        std::fs::write(&path, input).expect("write the crashing input");
        panic!(
            "fuzz target {target} panicked on {what}; input saved to {} \
             (add it to fuzz/corpus/{target}/ with the fix)",
            path.display()
        );
    };
    out
}

/// Runs every corpus file; returns each file's name and result.
fn replay<T>(target: &str, body: fn(&[u8]) -> T) -> Vec<(String, T)> {
    corpus(target)
        .into_iter()
        .map(|(name, data)| {
            let out = run_one(target, &format!("corpus file {name}"), body, &data);
            (name, out)
        })
        .collect()
}

/// Byte-level mutations in the spirit of libFuzzer's: flips, interesting values, inserts,
/// deletes, duplicated ranges, splices from another corpus file, and (for streams)
/// whole messages dropped, repeated or swapped.
struct Mutator {
    rng: fastrand::Rng,
    pool: Vec<Vec<u8>>,
    streams: bool,
}

impl Mutator {
    fn mutate(&mut self) -> Vec<u8> {
        let mut data = self.pool[self.rng.usize(..self.pool.len())].clone();
        for _ in 0..self.rng.usize(1..=4) {
            if self.streams && self.rng.u8(..4) == 0 {
                data = self.mutate_messages(&data);
            } else {
                self.mutate_bytes(&mut data);
            }
        }
        data
    }

    fn mutate_bytes(&mut self, data: &mut Vec<u8>) {
        const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'\\', b'$', b'['];
        let rng = &mut self.rng;
        if data.is_empty() {
            data.push(rng.u8(..));
            return;
        }
        let at = rng.usize(..data.len());
        match rng.u8(..7) {
            0 => data[at] ^= 1 << rng.u8(..8),
            1 => data[at] = INTERESTING[rng.usize(..INTERESTING.len())],
            2 => data.insert(at, rng.u8(..)),
            3 => {
                let end = (at + rng.usize(1..=16)).min(data.len());
                data.drain(at..end);
            }
            4 => {
                // Repeat a range: deep nesting, long runs, big counts.
                let end = (at + rng.usize(1..=8)).min(data.len());
                let chunk = data[at..end].to_vec();
                for _ in 0..rng.usize(1..=64) {
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            5 => {
                let other = &self.pool[rng.usize(..self.pool.len())];
                if !other.is_empty() {
                    let from = rng.usize(..other.len());
                    let end = (from + rng.usize(1..=64)).min(other.len());
                    data.splice(at..at, other[from..end].iter().copied());
                }
            }
            _ => {
                // A 32-bit field set to an edge value (lengths, counts, ids).
                let value: u32 = [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 0xffff][rng.usize(..6)];
                let end = (at + 4).min(data.len());
                data.splice(at..end, value.to_be_bytes());
            }
        }
    }

    fn mutate_messages(&mut self, data: &[u8]) -> Vec<u8> {
        let mut messages: Vec<Vec<u8>> =
            split_stream(data).into_iter().map(<[u8]>::to_vec).collect();
        if messages.is_empty() {
            return data.to_vec();
        }
        let rng = &mut self.rng;
        let i = rng.usize(..messages.len());
        match rng.u8(..4) {
            0 => {
                messages.remove(i);
            }
            1 => {
                let m = messages[i].clone();
                messages.insert(rng.usize(..=messages.len()), m);
            }
            2 => {
                let j = rng.usize(..messages.len());
                messages.swap(i, j);
            }
            _ => {
                let mut m = std::mem::take(&mut messages[i]);
                self.mutate_bytes(&mut m);
                messages[i] = m;
            }
        }
        frame_stream(messages.iter().map(Vec::as_slice))
    }
}

/// Mutates the corpus with a fixed seed until the budget is spent; returns the number
/// of inputs run.
fn mutation_loop<T>(target: &str, body: fn(&[u8]) -> T, seed: u64, streams: bool) -> usize {
    let mut mutator = Mutator {
        rng: fastrand::Rng::with_seed(seed),
        pool: corpus(target).into_iter().map(|(_, data)| data).collect(),
        streams,
    };
    let start = Instant::now();
    let deadline = start + MUTATION_BUDGET;
    let mut runs = 0;
    while runs < MUTATION_ROUNDS && Instant::now() < deadline {
        let input = mutator.mutate();
        run_one(
            target,
            &format!("mutation {runs} of seed {seed}"),
            body,
            &input,
        );
        runs += 1;
    }
    eprintln!("{target}: {runs} mutations in {:?}", start.elapsed());
    runs
}

#[test]
fn pgoutput_message_corpus_replays() {
    // Every real row change decodes in the pre-announced tables, down to its values.
    for (name, changes) in replay("pgoutput_message", pgoutput_message) {
        let is_change = name.starts_with(['I', 'U', 'D']);
        assert_eq!(changes, usize::from(is_change), "{name}");
    }
}

#[test]
fn pgoutput_stream_corpus_replays() {
    for (name, changes) in replay("pgoutput_stream", pgoutput_stream) {
        assert!(changes > 0, "{name}: a real session decodes row changes");
    }
}

#[test]
fn config_corpus_replays() {
    let valid = replay("config", config)
        .into_iter()
        .filter(|(_, ok)| *ok)
        .count();
    assert!(valid >= 1, "the example configs load");
}

#[test]
fn pgoutput_message_survives_mutations() {
    let runs = mutation_loop("pgoutput_message", pgoutput_message, 11, false);
    assert!(runs > 1000, "only {runs} mutations ran");
}

#[test]
fn pgoutput_stream_survives_mutations() {
    let runs = mutation_loop("pgoutput_stream", pgoutput_stream, 12, true);
    assert!(runs > 100, "only {runs} mutations ran");
}

#[test]
fn config_survives_mutations() {
    let runs = mutation_loop("config", config, 13, false);
    assert!(runs > 100, "only {runs} mutations ran");
}

#[test]
fn stream_framing_round_trips() {
    let messages: [&[u8]; 3] = [b"B123", b"", b"C4"];
    let framed = frame_stream(messages);
    assert_eq!(split_stream(&framed), messages);
    // A length past the end takes what is left; a short tail is one message.
    assert_eq!(split_stream(&[0, 0, 0, 9, b'x']), vec![&b"x"[..]]);
    assert_eq!(split_stream(&[0, 1]), vec![&[0u8, 1][..]]);
}
