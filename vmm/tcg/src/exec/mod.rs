//! The interpreter: executes one decoded instruction against the architectural state.
//!
//! `step` is the only entry point used by the block runner (`crate::cpu`); a JIT would replace
//! the block runner and call back into these helpers for slow paths.

mod alu;
mod avx;
mod avx2;
mod avx_cmp;
mod avx_legacy;
mod bits;
mod bmi;
pub(crate) mod control;
mod ext;
pub(crate) mod fma;
mod fma_unbounded;
mod mmx;
mod muldiv;
pub(crate) mod operand;
mod shift;
mod sse;
mod sse3;
mod sse41;
mod sse42;
mod sse_cmp;
pub(crate) mod sse_fp;
mod sse_native;
mod ssse3;
mod string;
pub(crate) mod system;
mod x87;
mod x87_arith;
mod x87_env;
mod x87_host;
mod x87_move;
mod x87_stack;
mod xsave;

// The shared vocabulary, for the handler modules (`use super::{Ctx, R, ...}`).
pub(crate) use crate::ctx::{gp, ud, vec, Ctx, Event, Handler, R};

use iced_x86::{Instruction, Mnemonic};

fn nop(_cx: &mut Ctx<'_>, _ins: &Instruction) -> R<()> {
    Ok(())
}

/// MFENCE: a host full barrier (orders this vCPU's stores before its later loads, as seen by
/// the other vCPUs). LFENCE/SFENCE are no-ops under the host's TSO.
fn mfence(_cx: &mut Ctx<'_>, _ins: &Instruction) -> R<()> {
    crate::atomic::full_fence();
    Ok(())
}

/// Selects the handler for a decoded instruction (done once, when a block is decoded).
pub(crate) fn select(ins: &Instruction) -> Handler {
    use Mnemonic as M;
    if avx::is_avx(ins) {
        return avx::exec;
    }
    match ins.mnemonic() {
        M::Mov => match alu::form(ins) {
            alu::Form::RegReg => alu::mov_rr,
            alu::Form::RegImm => alu::mov_ri,
            alu::Form::RegMem => alu::mov_load,
            alu::Form::MemReg => alu::mov_store,
            alu::Form::Other => alu::mov,
        },
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
            match alu::form(ins) {
                alu::Form::RegReg | alu::Form::RegImm => alu::binop_reg,
                _ => alu::binop,
            }
        }
        M::Lea => alu::lea,
        M::Movzx | M::Movsx | M::Movsxd => alu::movx,
        M::Inc | M::Dec | M::Not | M::Neg => alu::unop,
        M::Xchg => alu::xchg,
        M::Xadd => alu::xadd,
        M::Cmpxchg => alu::cmpxchg,
        M::Cmpxchg8b | M::Cmpxchg16b => alu::cmpxchg_wide,
        M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => alu::convert,
        M::Bswap => alu::bswap,
        M::Xlatb => alu::xlat,
        M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => alu::setcc,
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => alu::cmovcc,
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std | M::Lahf | M::Sahf => alu::flag_op,
        M::Mfence => mfence,
        M::Nop
        | M::Pause
        | M::Lfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Clflush
        | M::Clflushopt
        | M::Clwb
        | M::Wbinvd
        | M::Invd
        | M::Endbr64
        | M::Endbr32 => nop,
        M::Mul | M::Imul | M::Div | M::Idiv => muldiv::exec,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => shift::shift,
        M::Shld | M::Shrd => shift::shxd,
        M::Bt | M::Bts | M::Btr | M::Btc => bits::bt,
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt | M::Popcnt => bits::scan,
        M::Movsb
        | M::Movsw
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => string::exec,
        M::Movsd | M::Cmpsd if string::is_string(ins) => string::exec,
        M::Jmp
        | M::Call
        | M::Ret
        | M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg
        | M::Loop
        | M::Loope
        | M::Loopne
        | M::Jrcxz
        | M::Jecxz
        | M::Jcxz => control::branch,
        M::Push | M::Pop | M::Pushfq | M::Pushf | M::Popfq | M::Popf | M::Enter | M::Leave => {
            control::stack
        }
        M::Int3
        | M::Int
        | M::Int1
        | M::Into
        | M::Ud2
        | M::Ud0
        | M::Ud1
        | M::Hlt
        | M::Iretq
        | M::Iretd
        | M::Iret
        | M::Retf
        | M::Syscall
        | M::Sysretq
        | M::Sysret
        | M::Cli
        | M::Sti
        | M::Swapgs => control::system_flow,
        M::Cpuid
        | M::Rdmsr
        | M::Wrmsr
        | M::Rdtsc
        | M::Rdtscp
        | M::Lgdt
        | M::Lidt
        | M::Lldt
        | M::Ltr
        | M::Sgdt
        | M::Sidt
        | M::Sldt
        | M::Str
        | M::Invlpg
        | M::Smsw
        | M::Lmsw
        | M::Clts
        | M::In
        | M::Out
        | M::Lar
        | M::Lsl
        | M::Verr
        | M::Verw => system::exec,
        M::Cmpsd | M::Cmpss | M::Cmpps | M::Cmppd => sse_cmp::exec,
        M::Movsd => sse::exec,
        M::Rdrand | M::Rdseed | M::Movbe | M::Rdpid => ext::exec,
        M::Cvtpi2ps | M::Cvtpi2pd | M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => {
            mmx::exec
        }
        M::Fninit
        | M::Fnstcw
        | M::Fldcw
        | M::Fnstsw
        | M::Wait
        | M::Fnclex
        | M::Fxsave
        | M::Fxsave64
        | M::Fxrstor
        | M::Fxrstor64
        | M::Ldmxcsr
        | M::Stmxcsr
        | M::Emms => x87::exec,
        M::Pshufb
        | M::Phaddw
        | M::Phaddd
        | M::Phaddsw
        | M::Phsubw
        | M::Phsubd
        | M::Phsubsw
        | M::Pmaddubsw
        | M::Pmulhrsw
        | M::Psignb
        | M::Psignw
        | M::Psignd
        | M::Pabsb
        | M::Pabsw
        | M::Pabsd
        | M::Palignr => ssse3::exec,
        M::Pblendvb
        | M::Blendvps
        | M::Blendvpd
        | M::Ptest
        | M::Pmovsxbw
        | M::Pmovsxbd
        | M::Pmovsxbq
        | M::Pmovsxwd
        | M::Pmovsxwq
        | M::Pmovsxdq
        | M::Pmovzxbw
        | M::Pmovzxbd
        | M::Pmovzxbq
        | M::Pmovzxwd
        | M::Pmovzxwq
        | M::Pmovzxdq
        | M::Pmuldq
        | M::Pcmpeqq
        | M::Movntdqa
        | M::Packusdw
        | M::Pcmpgtq
        | M::Pminsb
        | M::Pminsd
        | M::Pminuw
        | M::Pminud
        | M::Pmaxsb
        | M::Pmaxsd
        | M::Pmaxuw
        | M::Pmaxud
        | M::Pmulld
        | M::Phminposuw
        | M::Roundps
        | M::Roundpd
        | M::Roundss
        | M::Roundsd
        | M::Blendps
        | M::Blendpd
        | M::Pblendw
        | M::Pextrb
        | M::Pextrd
        | M::Pextrq
        | M::Extractps
        | M::Pinsrb
        | M::Insertps
        | M::Pinsrd
        | M::Pinsrq
        | M::Dpps
        | M::Dppd
        | M::Mpsadbw => sse41::exec,
        M::Crc32
        | M::Pcmpestri
        | M::Pcmpestri64
        | M::Pcmpestrm
        | M::Pcmpestrm64
        | M::Pcmpistri
        | M::Pcmpistrm => sse42::exec,
        M::Addsubps
        | M::Addsubpd
        | M::Haddps
        | M::Haddpd
        | M::Hsubps
        | M::Hsubpd
        | M::Lddqu
        | M::Movddup
        | M::Movshdup
        | M::Movsldup => sse3::exec,
        M::Fld | M::Fisttp => x87_stack::exec,
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr
        | M::Fcomi
        | M::Fcomip
        | M::Fucomi
        | M::Fucomip => x87_arith::exec,
        M::Fst
        | M::Fstp
        | M::Fist
        | M::Fistp
        | M::Fild
        | M::Fldz
        | M::Fld1
        | M::Fchs
        | M::Fabs
        | M::Fxch
        | M::Fincstp
        | M::Fdecstp
        | M::Ffree => x87_move::exec,
        M::Fnstenv | M::Fldenv | M::Fnsave | M::Frstor | M::Ffreep | M::Fnop => x87_env::exec,
        m if x87_host::handles(m) => x87_host::exec,
        M::Xgetbv | M::Xsetbv | M::Xsave | M::Xsave64 | M::Xrstor | M::Xrstor64 => xsave::exec,
        M::Andn
        | M::Bextr
        | M::Blsi
        | M::Blsmsk
        | M::Blsr
        | M::Bzhi
        | M::Mulx
        | M::Pdep
        | M::Pext
        | M::Rorx
        | M::Sarx
        | M::Shlx
        | M::Shrx => bmi::exec,
        _ if mmx::uses_mm(ins) => mmx::exec,
        _ => sse::exec,
    }
}
