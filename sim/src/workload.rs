//! What `model-load` sends: prompt texts and multi-turn conversations.
//!
//! * `unique`: every request is one user message of pseudo-random words keyed
//!   by the run, the user (or the open-loop stream) and the request number, so
//!   no two requests share a prompt prefix beyond the chat template.
//! * `shared-prefix`: conversations, each in one of G groups whose system
//!   prompt is the same text for every conversation of the group. A turn sends
//!   the system prompt, the history (user messages and the answers received)
//!   and a new user message; after `turns` turns the conversation ends and a
//!   new one starts in a random group. A failed turn abandons its
//!   conversation (a client giving up).
//!
//! Every text is 4 characters per token (3 letters and a space; the answers
//! are the simulator's own filler words), which `model-server` counts as
//! exactly one token each. User messages are keyed by a per-run nonce, so a
//! server kept warm from an earlier run cannot hit on them either; system
//! prompts depend on `--seed` and the group only, so that every load
//! generator of a test shares them (a cold start needs fresh servers or
//! another seed).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::openai::filler;
use crate::rng::{Rng, SplitMix64};

/// Which prompts the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Unique,
    SharedPrefix,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadKind::Unique => "unique",
            WorkloadKind::SharedPrefix => "shared-prefix",
        })
    }
}

impl FromStr for WorkloadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unique" => Ok(WorkloadKind::Unique),
            "shared-prefix" => Ok(WorkloadKind::SharedPrefix),
            other => Err(format!(
                "invalid value '{other}' (expected unique or shared-prefix)"
            )),
        }
    }
}

/// Key stream of the group system prompts, apart from request streams.
const SYSTEM_STREAM: u64 = u64::MAX - 3;

fn mix(x: u64) -> u64 {
    SplitMix64::new(x).next_u64()
}

/// Key of the text of request `index` of `stream` in the run of `nonce`.
pub fn text_key(nonce: u64, stream: u64, index: u64) -> u64 {
    mix(mix(nonce ^ stream) ^ index)
}

/// Key of the system prompt of `group` under `seed`.
pub fn system_key(seed: u64, group: u64) -> u64 {
    text_key(seed, SYSTEM_STREAM, group)
}

/// `tokens` pseudo-random 3-letter words (4 characters each with the space),
/// the same for the same key.
pub fn words(key: u64, tokens: u64) -> String {
    let n = tokens.min(1 << 20) as usize;
    let mut s = String::with_capacity(n * 4);
    let mut sm = SplitMix64::new(key);
    for _ in 0..n {
        let h = sm.next_u64();
        for k in 0..3 {
            s.push(char::from(b'a' + ((h >> (8 * k)) % 26) as u8));
        }
        s.push(' ');
    }
    s
}

/// One finished turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub user_key: u64,
    pub user_tokens: u64,
    /// Tokens of the answer received.
    pub answer_tokens: u64,
}

/// The prompt of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// One user message of `tokens` tokens.
    Unique { key: u64, tokens: u64 },
    /// The next turn of a conversation.
    Conversation {
        system_key: u64,
        system_tokens: u64,
        history: Vec<Turn>,
        user_key: u64,
        user_tokens: u64,
    },
}

impl Prompt {
    /// Tokens of content (the chat template's role markers not counted).
    pub fn tokens(&self) -> u64 {
        match self {
            Prompt::Unique { tokens, .. } => *tokens,
            Prompt::Conversation {
                system_tokens,
                history,
                user_tokens,
                ..
            } => {
                system_tokens
                    + history
                        .iter()
                        .map(|t| t.user_tokens + t.answer_tokens)
                        .sum::<u64>()
                    + user_tokens
            }
        }
    }

    /// The chat messages, `(role, content)`, system first.
    pub fn messages(&self) -> Vec<(&'static str, String)> {
        match self {
            Prompt::Unique { key, tokens } => vec![("user", words(*key, *tokens))],
            Prompt::Conversation {
                system_key,
                system_tokens,
                history,
                user_key,
                user_tokens,
            } => {
                let mut m = Vec::with_capacity(2 + 2 * history.len());
                m.push(("system", words(*system_key, *system_tokens)));
                for t in history {
                    m.push(("user", words(t.user_key, t.user_tokens)));
                    m.push(("assistant", filler(t.answer_tokens)));
                }
                m.push(("user", words(*user_key, *user_tokens)));
                m
            }
        }
    }

    /// The completions-API prompt: the bare text of a unique prompt; a
    /// conversation rendered as `role: content\n` per message, which is what
    /// `model-server` tokenises a chat request as.
    pub fn text(&self) -> String {
        match self {
            Prompt::Unique { key, tokens } => words(*key, *tokens),
            Prompt::Conversation { .. } => {
                let mut s = String::new();
                for (role, content) in self.messages() {
                    s.push_str(role);
                    s.push_str(": ");
                    s.push_str(&content);
                    s.push('\n');
                }
                s
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Open {
    group: u64,
    history: Vec<Turn>,
    /// A turn is outstanding: the conversation cannot be continued yet.
    busy: bool,
}

/// A conversation picked for the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked {
    pub id: u64,
    pub group: u64,
    pub history: Vec<Turn>,
}

/// The open conversations of one closed-loop user (`target` 1) or of the
/// whole open loop (`target` = `--conversations`).
///
/// An arrival starts a new conversation while fewer than `target` are open,
/// else continues one of the idle ones chosen uniformly at random; when every
/// open conversation awaits an answer (overload), it starts one more. Ended
/// conversations are dropped, so the pool refills with new ones: in a steady
/// state one arrival in `turns` starts a conversation and a given
/// conversation's turns are about `target / rate` apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversations {
    target: usize,
    turns: u32,
    groups: u64,
    /// Share of new conversations that go to group 0 (the hot group); 0: groups are uniform.
    hot_share: f64,
    next_id: u64,
    open: BTreeMap<u64, Open>,
}

impl Conversations {
    pub fn new(target: usize, turns: u32, groups: u64) -> Conversations {
        Conversations {
            target: target.max(1),
            turns: turns.max(1),
            groups: groups.max(1),
            hot_share: 0.0,
            next_id: 0,
            open: BTreeMap::new(),
        }
    }

    /// Sends `share` (0..=1) of new conversations to group 0 and spreads the others uniformly
    /// over the remaining groups: with equal conversation lengths, group 0 then carries that
    /// share of all traffic. 0 (the default) draws every group uniformly. With one group, it
    /// is group 0 whatever the share.
    pub fn with_hot_share(mut self, share: f64) -> Conversations {
        self.hot_share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The group of a new conversation.
    fn draw_group(&self, rng: &mut Rng) -> u64 {
        if self.hot_share <= 0.0 || self.groups == 1 {
            return rng.range_inclusive(0, self.groups - 1);
        }
        if rng.chance(self.hot_share) {
            0
        } else {
            rng.range_inclusive(1, self.groups - 1)
        }
    }

    /// Conversations started and not ended.
    pub fn open(&self) -> usize {
        self.open.len()
    }

    /// Chooses the conversation of the next request and marks it busy.
    pub fn pick(&mut self, rng: &mut Rng) -> Picked {
        let idle: Vec<u64> = if self.open.len() < self.target {
            Vec::new()
        } else {
            self.open
                .iter()
                .filter(|(_, c)| !c.busy)
                .map(|(id, _)| *id)
                .collect()
        };
        let id = if idle.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            let group = self.draw_group(rng);
            self.open.insert(
                id,
                Open {
                    group,
                    history: Vec::new(),
                    busy: false,
                },
            );
            id
        } else {
            idle[rng.range_inclusive(0, idle.len() as u64 - 1) as usize]
        };
        match self.open.get_mut(&id) {
            Some(c) => {
                c.busy = true;
                Picked {
                    id,
                    group: c.group,
                    history: c.history.clone(),
                }
            }
            None => Picked {
                id,
                group: 0,
                history: Vec::new(),
            },
        }
    }

    /// Records the outcome of a turn: `Some` appends it (and ends the
    /// conversation after its last turn), `None` (it failed) abandons it.
    pub fn finish(&mut self, id: u64, turn: Option<Turn>) {
        let Some(turn) = turn else {
            self.open.remove(&id);
            return;
        };
        let Some(c) = self.open.get_mut(&id) else {
            return;
        };
        c.history.push(turn);
        c.busy = false;
        if c.history.len() >= self.turns as usize {
            self.open.remove(&id);
        }
    }

    /// Gives a picked conversation back unchanged (the request was never sent).
    pub fn release(&mut self, id: u64) {
        if let Some(c) = self.open.get_mut(&id) {
            c.busy = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::{block_hashes, tokenize};

    #[test]
    fn workload_names() {
        for k in [WorkloadKind::Unique, WorkloadKind::SharedPrefix] {
            assert_eq!(k.to_string().parse::<WorkloadKind>(), Ok(k));
        }
        assert!("shared".parse::<WorkloadKind>().is_err());
    }

    #[test]
    fn words_are_four_chars_per_token_and_keyed() {
        let a = words(1, 100);
        assert_eq!(a.len(), 400);
        assert!(a.bytes().all(|b| b == b' ' || b.is_ascii_lowercase()));
        assert_eq!(tokenize(&a).len(), 100);
        assert_eq!(a, words(1, 100));
        assert!(words(1, 150).starts_with(&a));
        assert_ne!(a[..64], words(2, 100)[..64]);
        assert!(words(1, 0).is_empty());
    }

    #[test]
    fn unique_prompts_share_no_block() {
        let nonce = 99;
        let mut first_blocks = std::collections::HashSet::new();
        for stream in 0..20 {
            for index in 0..50 {
                let p = Prompt::Unique {
                    key: text_key(nonce, stream, index),
                    tokens: 32,
                };
                // As the server sees it: "user: ...\n".
                let text = format!("user: {}\n", p.messages()[0].1);
                let blocks = block_hashes(&tokenize(&text));
                assert!(first_blocks.insert(blocks[0]), "{stream}/{index}");
            }
        }
        assert_ne!(text_key(1, 0, 0), text_key(2, 0, 0), "runs differ");
    }

    fn conversation(history: Vec<Turn>, user_key: u64) -> Prompt {
        Prompt::Conversation {
            system_key: system_key(5, 3),
            system_tokens: 40,
            history,
            user_key,
            user_tokens: 10,
        }
    }

    #[test]
    fn conversation_prompts_grow_and_share_prefixes() {
        let turn = Turn {
            user_key: 11,
            user_tokens: 10,
            answer_tokens: 7,
        };
        let first = conversation(Vec::new(), 11);
        let second = conversation(vec![turn], 12);
        assert_eq!(first.tokens(), 50);
        assert_eq!(second.tokens(), 67);
        let roles: Vec<&str> = second.messages().iter().map(|m| m.0).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(second.messages()[2].1, filler(7));
        // The second turn's prompt extends the first's.
        assert!(second.text().starts_with(&first.text()));
        assert_eq!(
            first.text().len() as u64,
            4 * 50 + "system: \nuser: \n".len() as u64
        );
        // Another conversation of the group shares the system prompt only.
        let other = conversation(Vec::new(), 77);
        let (a, b) = (
            block_hashes(&tokenize(&first.text())),
            block_hashes(&tokenize(&other.text())),
        );
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        let g4 = Prompt::Conversation {
            system_key: system_key(5, 4),
            system_tokens: 40,
            history: Vec::new(),
            user_key: 11,
            user_tokens: 10,
        };
        assert_ne!(
            block_hashes(&tokenize(&g4.text()))[0],
            a[0],
            "groups differ"
        );
    }

    #[test]
    fn closed_loop_user_runs_conversations_of_n_turns() {
        let mut c = Conversations::new(1, 3, 8);
        let mut rng = Rng::new(1);
        let turn = |k| Turn {
            user_key: k,
            user_tokens: 1,
            answer_tokens: 2,
        };
        let p = c.pick(&mut rng);
        assert!(p.history.is_empty() && p.group < 8);
        c.finish(p.id, Some(turn(1)));
        let q = c.pick(&mut rng);
        assert_eq!((q.id, q.group, q.history.len()), (p.id, p.group, 1));
        c.finish(q.id, Some(turn(2)));
        let r = c.pick(&mut rng);
        assert_eq!((r.id, r.history.len()), (p.id, 2));
        c.finish(r.id, Some(turn(3)));
        assert_eq!(c.open(), 0, "ended after 3 turns");
        let s = c.pick(&mut rng);
        assert_ne!(s.id, p.id);
        assert!(s.history.is_empty());
        // A failed turn abandons the conversation; a release keeps it as it was.
        c.release(s.id);
        assert_eq!(c.pick(&mut rng).id, s.id);
        c.finish(s.id, None);
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn open_loop_pool_keeps_target_conversations() {
        let mut c = Conversations::new(4, 3, 2);
        let mut rng = Rng::new(7);
        let first: Vec<Picked> = (0..4).map(|_| c.pick(&mut rng)).collect();
        assert!(first.iter().all(|p| p.history.is_empty()));
        assert_eq!(c.open(), 4);
        // All busy: overload starts one more.
        let extra = c.pick(&mut rng);
        assert!(extra.history.is_empty());
        assert_eq!(c.open(), 5);
        for p in &first {
            c.finish(
                p.id,
                Some(Turn {
                    user_key: p.id,
                    user_tokens: 1,
                    answer_tokens: 1,
                }),
            );
        }
        // At the target with idle ones: continue one of them.
        let next = c.pick(&mut rng);
        assert_eq!(next.history.len(), 1);
        assert!(first.iter().any(|p| p.id == next.id));
        assert_eq!(c.open(), 5);
        // Every group gets used.
        let mut groups = std::collections::BTreeSet::new();
        let mut pool = Conversations::new(1, 1, 2);
        for _ in 0..50 {
            let p = pool.pick(&mut rng);
            groups.insert(p.group);
            pool.finish(
                p.id,
                Some(Turn {
                    user_key: 0,
                    user_tokens: 1,
                    answer_tokens: 1,
                }),
            );
        }
        assert_eq!(groups.len(), 2);
    }

    #[test]
    fn a_hot_group_carries_its_share_of_new_conversations() {
        let mut rng = Rng::new(3);
        let mut c = Conversations::new(1, 1, 10).with_hot_share(0.5);
        let mut counts = [0u32; 10];
        for _ in 0..20_000 {
            let p = c.pick(&mut rng);
            counts[p.group as usize] += 1;
            c.finish(
                p.id,
                Some(Turn {
                    user_key: 0,
                    user_tokens: 1,
                    answer_tokens: 1,
                }),
            );
        }
        let hot = f64::from(counts[0]) / 20_000.0;
        assert!((hot - 0.5).abs() < 0.02, "{counts:?}");
        // The others share the rest evenly: about 1/18 each.
        for &n in &counts[1..] {
            let share = f64::from(n) / 20_000.0;
            assert!((share - 0.5 / 9.0).abs() < 0.015, "{counts:?}");
        }
        // Share 0 keeps the uniform draw (and its random sequence) unchanged.
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        let mut plain = Conversations::new(1, 1, 10);
        let mut zero = Conversations::new(1, 1, 10).with_hot_share(0.0);
        for _ in 0..50 {
            let (p, q) = (plain.pick(&mut a), zero.pick(&mut b));
            assert_eq!(p.group, q.group);
            let turn = Some(Turn {
                user_key: 0,
                user_tokens: 1,
                answer_tokens: 1,
            });
            plain.finish(p.id, turn);
            zero.finish(q.id, turn);
        }
        // One group: always group 0.
        let mut one = Conversations::new(1, 1, 1).with_hot_share(0.3);
        assert_eq!(one.pick(&mut rng).group, 0);
    }
}
