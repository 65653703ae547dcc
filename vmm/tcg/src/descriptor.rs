//! Segment descriptors read from the GDT/LDT, for segment loads, far control transfers and
//! interrupt delivery.

use crate::ctx::{vec, Ctx, Event, R};
use crate::state::Segment;

/// Reads the descriptor for `sel` from the GDT/LDT (implicit supervisor access).
pub fn read_descriptor(cx: &mut Ctx<'_>, sel: u16) -> R<Segment> {
    let (base, limit) = if sel & 4 != 0 {
        (cx.s.ldtr.base, u64::from(cx.s.ldtr.limit))
    } else {
        (cx.s.gdtr.base, u64::from(cx.s.gdtr.limit))
    };
    let off = u64::from(sel & 0xFFF8);
    let err = Event::fault(vec::GP, Some(u32::from(sel & 0xFFFC)));
    if sel & 0xFFFC == 0 || off + 7 > limit {
        return Err(err);
    }
    let saved = cx.implicit_sup;
    cx.implicit_sup = true;
    let r = (|| {
        let d = cx.read(base.wrapping_add(off), 8)?;
        let hi = if d & (1 << 44) == 0 {
            if off + 15 > limit {
                return Err(err.clone());
            }
            cx.read(base.wrapping_add(off + 8), 4)? as u32
        } else {
            0
        };
        Ok(Segment::from_descriptor(sel, d, hi))
    })();
    cx.implicit_sup = saved;
    r
}
