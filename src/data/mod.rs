//! Competition data: CSV rows become typed [`Battle`]s, the first step of the data flow.

pub mod csv;
pub mod folds;
pub mod json_turns;

pub use self::csv::{read_battles, BattleReader, ReadOptions, ReadStats};

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

    /// All prompt turns joined by newlines: the key that groups rows sharing a prompt.
    pub fn prompt_text(&self) -> String {
        let parts: Vec<&str> = self
            .turns
            .iter()
            .map(|t| t.prompt.as_deref().unwrap_or(""))
            .collect();
        parts.join("\n")
    }
}
