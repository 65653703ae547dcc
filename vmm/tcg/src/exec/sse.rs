//! SSE/SSE2 integer and data-movement subset.

use super::{ud, Ctx, R};
use iced_x86::Instruction;

pub fn exec(_cx: &mut Ctx<'_>, _ins: &Instruction) -> R<()> {
    ud()
}
