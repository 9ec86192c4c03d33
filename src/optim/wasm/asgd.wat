;; One step of torch.optim.ASGD's _single_tensor_asgd (torch/optim/asgd.py) on float32 tensors,
;; four lanes at a time, bit for bit as PyTorch on a SIMD (FMA) CPU. Built by scripts/build-wasm.ts.
;;
;; Per element (the scalars are prepared by src/optim/wasm/index.ts from the float32 state):
;;   g  = maximize ? -grad : grad
;;   g  = fma(param, wd, g)                 if weight decay   (grad.add(param, alpha=wd))
;;   p  = fma(g, negEta, param * decay)                       (param.mul_(...); param.add_(grad, alpha=-eta))
;;   ax = ax + ((p - ax) * mu)              if averaging, else ax = p
;;
;; fma(a, b, c), rounded once to float32, has no wasm instruction. The product of two float32 is
;; exact in f64; the f64 sum then rounds once, and rounding that to f32 is right unless the f64 sum
;; is exactly a float32 midpoint (and not exact). The fast path detects that conservatively: a
;; midpoint has its low 28 f64 mantissa bits zero and is not itself a float32. A block of four with
;; such a lane is redone by $block_exact, which rounds the f64 sum to odd first (TwoSum error
;; decides), after which rounding to f32 is always correct. The last n % 4 elements go through the
;; same exact block via a scratch area at address 0.
;;
;; Flags: 1 weight decay, 2 averaging (mu != 1), 4 maximize, 8 unfused (ATEN_CPU_CAPABILITY=default:
;; multiply and add rounded separately).
(module
  (import "env" "memory" (memory 1))

  ;; scratch for the tail: param at 0, grad at 16, ax at 32
  (global $TAIL_P i32 (i32.const 0))
  (global $TAIL_G i32 (i32.const 16))
  (global $TAIL_A i32 (i32.const 32))

  ;; ---------------------------------------------------------------- exact fma of four lanes
  ;; round-to-odd of the f64 sum: truncate toward zero (s - 1 ulp when |exact| < |s|), set the lowest bit.
  (func $round_odd (param $p v128) (param $c v128) (result v128)
    (local $s v128) (local $bb v128) (local $e v128) (local $inexact v128)
    (local.set $s (f64x2.add (local.get $p) (local.get $c)))
    (local.set $bb (f64x2.sub (local.get $s) (local.get $p)))
    (local.set $e (f64x2.add
      (f64x2.sub (local.get $p) (f64x2.sub (local.get $s) (local.get $bb)))
      (f64x2.sub (local.get $c) (local.get $bb))))
    ;; e < 0 or e > 0 (false for NaN, which only infinite inputs produce)
    (local.set $inexact (v128.or
      (f64x2.lt (local.get $e) (v128.const f64x2 0 0))
      (f64x2.gt (local.get $e) (v128.const f64x2 0 0))))
    (v128.or
      (i64x2.add (local.get $s)
        (v128.and (local.get $inexact) (i64x2.shr_s (v128.xor (local.get $e) (local.get $s)) (i32.const 63))))
      (i64x2.shr_u (local.get $inexact) (i32.const 63))))

  (func $fma_exact (param $a v128) (param $b v128) (param $c v128) (result v128)
    ;; $b holds the multiplier as f64x2 (both lanes equal)
    (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
      (f32x4.demote_f64x2_zero (call $round_odd
        (f64x2.mul (f64x2.promote_low_f32x4 (local.get $a)) (local.get $b))
        (f64x2.promote_low_f32x4 (local.get $c))))
      (f32x4.demote_f64x2_zero (call $round_odd
        (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $a) (local.get $a))) (local.get $b))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $c) (local.get $c)))))))

  ;; one block of four elements, exactly (fused) or unfused, read from and written to memory
  (func $block (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $negEta v128) (param $negEtaD v128) (param $wd v128) (param $wdD v128)
      (param $mu v128) (param $sign v128) (param $flags i32)
    (local $p v128) (local $g v128) (local $a v128)
    (local.set $p (v128.load (local.get $pp)))
    (local.set $g (v128.xor (v128.load (local.get $gp)) (local.get $sign)))
    (if (i32.and (local.get $flags) (i32.const 8))
      (then
        (if (i32.and (local.get $flags) (i32.const 1))
          (then (local.set $g (f32x4.add (local.get $g) (f32x4.mul (local.get $p) (local.get $wd))))))
        (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $decay)) (f32x4.mul (local.get $g) (local.get $negEta)))))
      (else
        (if (i32.and (local.get $flags) (i32.const 1))
          (then (local.set $g (call $fma_exact (local.get $p) (local.get $wdD) (local.get $g)))))
        (local.set $p (call $fma_exact (local.get $g) (local.get $negEtaD) (f32x4.mul (local.get $p) (local.get $decay))))))
    (if (i32.and (local.get $flags) (i32.const 2))
      (then
        (local.set $a (v128.load (local.get $ap)))
        (local.set $a (f32x4.add (local.get $a) (f32x4.mul (f32x4.sub (local.get $p) (local.get $a)) (local.get $mu)))))
      (else (local.set $a (local.get $p))))
    (v128.store (local.get $pp) (local.get $p))
    (v128.store (local.get $ap) (local.get $a)))

  ;; ---------------------------------------------------------------- the step
  (func (export "step") (param $n i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decayS f32) (param $negEtaS f32) (param $wdS f32) (param $muS f32) (param $flags i32)
    (local $decay v128) (local $negEta v128) (local $negEtaD v128) (local $wd v128) (local $wdD v128)
    (local $mu v128) (local $sign v128)
    (local $end i32) (local $rest i32) (local $i i32)
    (local $p v128) (local $g v128) (local $a v128) (local $p1 v128)
    (local $s0 v128) (local $s1 v128) (local $r0 v128) (local $r1 v128) (local $bad v128)
    (local $hasWd i32) (local $averaging i32)
    (local.set $decay (f32x4.splat (local.get $decayS)))
    (local.set $negEta (f32x4.splat (local.get $negEtaS)))
    (local.set $negEtaD (f64x2.splat (f64.promote_f32 (local.get $negEtaS))))
    (local.set $wd (f32x4.splat (local.get $wdS)))
    (local.set $wdD (f64x2.splat (f64.promote_f32 (local.get $wdS))))
    (local.set $mu (f32x4.splat (local.get $muS)))
    (local.set $sign (i32x4.splat (select (i32.const 0x80000000) (i32.const 0) (i32.and (local.get $flags) (i32.const 4)))))
    (local.set $hasWd (i32.and (local.get $flags) (i32.const 1)))
    (local.set $averaging (i32.and (local.get $flags) (i32.const 2)))
    (local.set $end (i32.shl (i32.and (local.get $n) (i32.const -4)) (i32.const 2)))

    (if (i32.and (local.get $flags) (i32.const 8))
      (then
        ;; unfused: no midpoint problem, every block is the plain one
        (block $done_u (loop $blocks_u
          (br_if $done_u (i32.ge_u (local.get $i) (local.get $end)))
          (call $block
            (i32.add (local.get $pp) (local.get $i)) (i32.add (local.get $gp) (local.get $i)) (i32.add (local.get $ap) (local.get $i))
            (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
            (local.get $mu) (local.get $sign) (local.get $flags))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br $blocks_u))))
      (else
        (block $done (loop $blocks
          (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
          (local.set $p (v128.load (i32.add (local.get $pp) (local.get $i))))
          (local.set $g (v128.xor (v128.load (i32.add (local.get $gp) (local.get $i))) (local.get $sign)))
          (local.set $bad (v128.const i64x2 0 0))

          (if (local.get $hasWd)
            (then
              ;; g = fma(p, wd, g)
              (local.set $s0 (f64x2.add
                (f64x2.mul (f64x2.promote_low_f32x4 (local.get $p)) (local.get $wdD))
                (f64x2.promote_low_f32x4 (local.get $g))))
              (local.set $s1 (f64x2.add
                (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p) (local.get $p))) (local.get $wdD))
                (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g) (local.get $g)))))
              (local.set $r0 (f32x4.demote_f64x2_zero (local.get $s0)))
              (local.set $r1 (f32x4.demote_f64x2_zero (local.get $s1)))
              (local.set $bad (v128.or
                (v128.and
                  (i64x2.eq (v128.and (local.get $s0) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
                  (f64x2.ne (local.get $s0) (f64x2.promote_low_f32x4 (local.get $r0))))
                (v128.and
                  (i64x2.eq (v128.and (local.get $s1) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
                  (f64x2.ne (local.get $s1) (f64x2.promote_low_f32x4 (local.get $r1))))))
              (local.set $g (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $r0) (local.get $r1)))))

          ;; p = fma(g, negEta, p * decay)
          (local.set $p1 (f32x4.mul (local.get $p) (local.get $decay)))
          (local.set $s0 (f64x2.add
            (f64x2.mul (f64x2.promote_low_f32x4 (local.get $g)) (local.get $negEtaD))
            (f64x2.promote_low_f32x4 (local.get $p1))))
          (local.set $s1 (f64x2.add
            (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g) (local.get $g))) (local.get $negEtaD))
            (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p1) (local.get $p1)))))
          (local.set $r0 (f32x4.demote_f64x2_zero (local.get $s0)))
          (local.set $r1 (f32x4.demote_f64x2_zero (local.get $s1)))
          (local.set $bad (v128.or (local.get $bad) (v128.or
            (v128.and
              (i64x2.eq (v128.and (local.get $s0) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
              (f64x2.ne (local.get $s0) (f64x2.promote_low_f32x4 (local.get $r0))))
            (v128.and
              (i64x2.eq (v128.and (local.get $s1) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
              (f64x2.ne (local.get $s1) (f64x2.promote_low_f32x4 (local.get $r1)))))))
          (local.set $p (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 (local.get $r0) (local.get $r1)))

          (if (v128.any_true (local.get $bad))
            (then
              ;; a lane may sit on a float32 midpoint: redo the block exactly (memory is untouched so far)
              (call $block
                (i32.add (local.get $pp) (local.get $i)) (i32.add (local.get $gp) (local.get $i)) (i32.add (local.get $ap) (local.get $i))
                (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
                (local.get $mu) (local.get $sign) (local.get $flags)))
            (else
              (if (local.get $averaging)
                (then
                  (local.set $a (v128.load (i32.add (local.get $ap) (local.get $i))))
                  (local.set $a (f32x4.add (local.get $a) (f32x4.mul (f32x4.sub (local.get $p) (local.get $a)) (local.get $mu)))))
                (else (local.set $a (local.get $p))))
              (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p))
              (v128.store (i32.add (local.get $ap) (local.get $i)) (local.get $a))))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br $blocks)))))

    ;; the last n % 4 elements: through the scratch block at address 0 (lanes past n are zeros)
    (local.set $rest (i32.sub (i32.shl (local.get $n) (i32.const 2)) (local.get $end)))
    (if (local.get $rest)
      (then
        (v128.store (global.get $TAIL_P) (v128.const i64x2 0 0))
        (v128.store (global.get $TAIL_G) (v128.const i64x2 0 0))
        (v128.store (global.get $TAIL_A) (v128.const i64x2 0 0))
        (memory.copy (global.get $TAIL_P) (i32.add (local.get $pp) (local.get $end)) (local.get $rest))
        (memory.copy (global.get $TAIL_G) (i32.add (local.get $gp) (local.get $end)) (local.get $rest))
        (memory.copy (global.get $TAIL_A) (i32.add (local.get $ap) (local.get $end)) (local.get $rest))
        (call $block (global.get $TAIL_P) (global.get $TAIL_G) (global.get $TAIL_A)
          (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
          (local.get $mu) (local.get $sign) (local.get $flags))
        (memory.copy (i32.add (local.get $pp) (local.get $end)) (global.get $TAIL_P) (local.get $rest))
        (memory.copy (i32.add (local.get $ap) (local.get $end)) (global.get $TAIL_A) (local.get $rest)))))
)
