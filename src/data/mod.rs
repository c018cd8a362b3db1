//! Competition data: CSV rows become typed [`Battle`]s, the first step of the data flow.

pub mod csv;
pub mod folds;
pub mod format;
pub mod json_turns;

pub use self::csv::{read_battles, report_skipped, BattleReader, ReadArgs, ReadOptions, ReadStats};

/// Which side the human preferred; the three classes of the task, in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Winner {
    A,
    B,
    Tie,
}

impl Winner {
    /// All classes in submission column order (`winner_model_a, winner_model_b, winner_tie`).
    pub const ALL: [Winner; 3] = [Winner::A, Winner::B, Winner::Tie];

    /// Column index in a probability triple.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label after swapping responses A and B.
    pub fn swapped(self) -> Winner {
        match self {
            Winner::A => Winner::B,
            Winner::B => Winner::A,
            Winner::Tie => Winner::Tie,
        }
    }
}

/// One conversation turn: the user's message and both models' answers (`None` = JSON null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub prompt: Option<String>,
    pub response_a: Option<String>,
    pub response_b: Option<String>,
}

/// One competition row: a prompt answered by two anonymous models, and the vote if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Battle {
    pub id: String,
    pub model_a: Option<String>,
    pub model_b: Option<String>,
    pub turns: Vec<Turn>,
    pub winner: Option<Winner>,
}

/// One of the two responses of a battle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Battle {
    /// The same battle with responses A and B (and their models and the label) exchanged.
    pub fn swapped(&self) -> Battle {
        Battle {
            id: self.id.clone(),
            model_a: self.model_b.clone(),
            model_b: self.model_a.clone(),
            turns: self
                .turns
                .iter()
                .map(|t| Turn {
                    prompt: t.prompt.clone(),
                    response_a: t.response_b.clone(),
                    response_b: t.response_a.clone(),
                })
                .collect(),
            winner: self.winner.map(Winner::swapped),
        }
    }

    /// The texts of one side's responses, turn by turn (`None` for null turns).
    pub fn responses(&self, side: Side) -> impl Iterator<Item = Option<&str>> {
        self.turns.iter().map(move |t| match side {
            Side::A => t.response_a.as_deref(),
            Side::B => t.response_b.as_deref(),
        })
    }

    /// A stable 64-bit hash (FNV-1a) of all prompt turns: the key that groups rows sharing
    /// a prompt in cross-validation. Stable across runs and Rust versions, unlike std's hasher.
    pub fn prompt_key(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for t in &self.turns {
            // A marker byte starts each turn, so null, "" and turn boundaries all hash apart.
            let (marker, text) = match &t.prompt {
                Some(s) => (1u8, s.as_bytes()),
                None => (0u8, &[][..]),
            };
            for &byte in std::iter::once(&marker).chain(text) {
                h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}
