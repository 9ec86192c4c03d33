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
;; is exactly a float32 midpoint (and not exact). The fast loops screen for that cheaply: a
;; midpoint has its low 28 f64 mantissa bits zero. Only a block of four with such a lane is checked
;; precisely ($needs_exact: also not a float32 itself), and if need be redone by $block, which
;; rounds the f64 sum to odd first (the TwoSum error decides), after which rounding to f32 is always
;; right. Leftover blocks and the last n % 4 elements (through a scratch area at address 0) go
;; through $block too. The fast loops are specialised per configuration (weight decay, averaging):
;; branches inside them cost V8 about a quarter of the speed.
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

  ;; ---------------------------------------------------------------- helpers of the fast path
  ;; Does any lane of the f64 sums s0, s1 sit exactly on a float32 midpoint (low 28 mantissa bits
  ;; zero and not a float32 itself)? Only then can rounding the f64 sum to f32 be wrong.
  (func $needs_exact (param $s0 v128) (param $s1 v128) (result i32)
    (v128.any_true (v128.or
      (v128.and
        (i64x2.eq (v128.and (local.get $s0) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (f64x2.ne (local.get $s0) (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $s0)))))
      (v128.and
        (i64x2.eq (v128.and (local.get $s1) (v128.const i64x2 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (f64x2.ne (local.get $s1) (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $s1))))))))

  ;; store the new param and ax of one block whose param p is final
  (func $finish (param $pp i32) (param $ap i32) (param $p v128) (param $mu v128) (param $averaging i32)
    (local $a v128)
    (if (local.get $averaging)
      (then
        (local.set $a (v128.load (local.get $ap)))
        (local.set $a (f32x4.add (local.get $a) (f32x4.mul (f32x4.sub (local.get $p) (local.get $a)) (local.get $mu)))))
      (else (local.set $a (local.get $p))))
    (v128.store (local.get $pp) (local.get $p))
    (v128.store (local.get $ap) (local.get $a)))


  ;; ---------------------------------------------------------------- fast loops, eight elements per iteration
  ;; Each returns how many bytes of each tensor it did (a multiple of 32, at most $end).
  ;; no weight decay, ax = param; maximize folds into the sign of eta ((-g) * (-eta) = g * eta, exactly)
  (func $fast_nowd_copy (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $negEta v128) (param $negEtaD v128) (param $wd v128) (param $wdD v128)
      (param $mu v128) (param $sign v128) (param $flags i32) (result i32)
    (local $i i32) (local $averaging i32) (local $etaD v128)
    (local $p0 v128) (local $g0 v128) (local $q0 v128) (local $a0 v128) (local $bad0 v128) (local $h00 v128) (local $h10 v128) (local $s00 v128) (local $s10 v128)
    (local $p1 v128) (local $g1 v128) (local $q1 v128) (local $a1 v128) (local $bad1 v128) (local $h01 v128) (local $h11 v128) (local $s01 v128) (local $s11 v128)
    (local.set $averaging (i32.and (local.get $flags) (i32.const 2)))
    (local.set $etaD (select (f64x2.neg (local.get $negEtaD)) (local.get $negEtaD) (i32.and (local.get $flags) (i32.const 4))))
    (block $done (loop $blocks
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      ;; block 0: the first four elements
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.load (i32.add (local.get $gp) (local.get $i))))
      (local.set $h00 (f64x2.promote_low_f32x4 (local.get $g0)))
      (local.set $h10 (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g0) (local.get $g0))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q0 (f32x4.mul (local.get $p0) (local.get $decay)))
      (local.set $s00 (f64x2.add (f64x2.mul (local.get $h00) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q0))))
      (local.set $s10 (f64x2.add (f64x2.mul (local.get $h10) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q0) (local.get $q0)))))
      (local.set $p0 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s00)) (f32x4.demote_f64x2_zero (local.get $s10))))
      (local.set $bad0 (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s00) (local.get $s10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0)))
      ;; block 1: the second four elements
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))))
      (local.set $h01 (f64x2.promote_low_f32x4 (local.get $g1)))
      (local.set $h11 (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g1) (local.get $g1))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q1 (f32x4.mul (local.get $p1) (local.get $decay)))
      (local.set $s01 (f64x2.add (f64x2.mul (local.get $h01) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q1))))
      (local.set $s11 (f64x2.add (f64x2.mul (local.get $h11) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q1) (local.get $q1)))))
      (local.set $p1 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s01)) (f32x4.demote_f64x2_zero (local.get $s11))))
      (local.set $bad1 (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s01) (local.get $s11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0)))
      (if (v128.any_true (v128.or (local.get $bad0) (local.get $bad1)))
        (then
          ;; a lane's f64 sum may be a float32 midpoint: check precisely, redo such a block exactly
          ;; (its memory is untouched so far)
          (if (call $needs_exact (local.get $s00) (local.get $s10))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0))) (local.get $p0) (local.get $mu) (local.get $averaging))))
          (if (call $needs_exact (local.get $s01) (local.get $s11))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16))) (local.get $p1) (local.get $mu) (local.get $averaging)))))
        (else
          (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
          (v128.store (i32.add (local.get $ap) (local.get $i)) (local.get $p0))
          (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
          (v128.store offset=16 (i32.add (local.get $ap) (local.get $i)) (local.get $p1))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $blocks)))
    (local.get $i))

  ;; no weight decay, averaging; maximize folds into the sign of eta ((-g) * (-eta) = g * eta, exactly)
  (func $fast_nowd_avg (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $negEta v128) (param $negEtaD v128) (param $wd v128) (param $wdD v128)
      (param $mu v128) (param $sign v128) (param $flags i32) (result i32)
    (local $i i32) (local $averaging i32) (local $etaD v128)
    (local $p0 v128) (local $g0 v128) (local $q0 v128) (local $a0 v128) (local $bad0 v128) (local $h00 v128) (local $h10 v128) (local $s00 v128) (local $s10 v128)
    (local $p1 v128) (local $g1 v128) (local $q1 v128) (local $a1 v128) (local $bad1 v128) (local $h01 v128) (local $h11 v128) (local $s01 v128) (local $s11 v128)
    (local.set $averaging (i32.and (local.get $flags) (i32.const 2)))
    (local.set $etaD (select (f64x2.neg (local.get $negEtaD)) (local.get $negEtaD) (i32.and (local.get $flags) (i32.const 4))))
    (block $done (loop $blocks
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      ;; block 0: the first four elements
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.load (i32.add (local.get $gp) (local.get $i))))
      (local.set $h00 (f64x2.promote_low_f32x4 (local.get $g0)))
      (local.set $h10 (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g0) (local.get $g0))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q0 (f32x4.mul (local.get $p0) (local.get $decay)))
      (local.set $s00 (f64x2.add (f64x2.mul (local.get $h00) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q0))))
      (local.set $s10 (f64x2.add (f64x2.mul (local.get $h10) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q0) (local.get $q0)))))
      (local.set $p0 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s00)) (f32x4.demote_f64x2_zero (local.get $s10))))
      (local.set $bad0 (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s00) (local.get $s10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0)))
      ;; block 1: the second four elements
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))))
      (local.set $h01 (f64x2.promote_low_f32x4 (local.get $g1)))
      (local.set $h11 (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g1) (local.get $g1))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q1 (f32x4.mul (local.get $p1) (local.get $decay)))
      (local.set $s01 (f64x2.add (f64x2.mul (local.get $h01) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q1))))
      (local.set $s11 (f64x2.add (f64x2.mul (local.get $h11) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q1) (local.get $q1)))))
      (local.set $p1 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s01)) (f32x4.demote_f64x2_zero (local.get $s11))))
      (local.set $bad1 (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s01) (local.get $s11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0)))
      (if (v128.any_true (v128.or (local.get $bad0) (local.get $bad1)))
        (then
          ;; a lane's f64 sum may be a float32 midpoint: check precisely, redo such a block exactly
          ;; (its memory is untouched so far)
          (if (call $needs_exact (local.get $s00) (local.get $s10))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0))) (local.get $p0) (local.get $mu) (local.get $averaging))))
          (if (call $needs_exact (local.get $s01) (local.get $s11))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16))) (local.get $p1) (local.get $mu) (local.get $averaging)))))
        (else
          (local.set $a0 (v128.load (i32.add (local.get $ap) (local.get $i))))
          (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
          (v128.store (i32.add (local.get $ap) (local.get $i))
            (f32x4.add (local.get $a0) (f32x4.mul (f32x4.sub (local.get $p0) (local.get $a0)) (local.get $mu))))
          (local.set $a1 (v128.load offset=16 (i32.add (local.get $ap) (local.get $i))))
          (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
          (v128.store offset=16 (i32.add (local.get $ap) (local.get $i))
            (f32x4.add (local.get $a1) (f32x4.mul (f32x4.sub (local.get $p1) (local.get $a1)) (local.get $mu))))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $blocks)))
    (local.get $i))

  ;; weight decay, ax = param
  (func $fast_wd_copy (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $negEta v128) (param $negEtaD v128) (param $wd v128) (param $wdD v128)
      (param $mu v128) (param $sign v128) (param $flags i32) (result i32)
    (local $i i32) (local $averaging i32) (local $etaD v128)
    (local $p0 v128) (local $g0 v128) (local $q0 v128) (local $a0 v128) (local $bad0 v128) (local $h00 v128) (local $h10 v128) (local $s00 v128) (local $s10 v128)
    (local $p1 v128) (local $g1 v128) (local $q1 v128) (local $a1 v128) (local $bad1 v128) (local $h01 v128) (local $h11 v128) (local $s01 v128) (local $s11 v128)
    (local $w00 v128) (local $w10 v128) (local $w01 v128) (local $w11 v128)
    (local.set $averaging (i32.and (local.get $flags) (i32.const 2)))
    (local.set $etaD (local.get $negEtaD))
    (block $done (loop $blocks
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      ;; block 0: the first four elements
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.xor (v128.load (i32.add (local.get $gp) (local.get $i))) (local.get $sign)))
      ;; g = fma(p, wd, g), kept as two f64x2 (exact float32 values)
      (local.set $w00 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (local.get $p0)) (local.get $wdD))
        (f64x2.promote_low_f32x4 (local.get $g0))))
      (local.set $w10 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p0) (local.get $p0))) (local.get $wdD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g0) (local.get $g0)))))
      (local.set $h00 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w00))))
      (local.set $h10 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w10))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q0 (f32x4.mul (local.get $p0) (local.get $decay)))
      (local.set $s00 (f64x2.add (f64x2.mul (local.get $h00) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q0))))
      (local.set $s10 (f64x2.add (f64x2.mul (local.get $h10) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q0) (local.get $q0)))))
      (local.set $p0 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s00)) (f32x4.demote_f64x2_zero (local.get $s10))))
      (local.set $bad0 (v128.or (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $w00) (local.get $w10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s00) (local.get $s10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))))
      ;; block 1: the second four elements
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.xor (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))) (local.get $sign)))
      ;; g = fma(p, wd, g), kept as two f64x2 (exact float32 values)
      (local.set $w01 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (local.get $p1)) (local.get $wdD))
        (f64x2.promote_low_f32x4 (local.get $g1))))
      (local.set $w11 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p1) (local.get $p1))) (local.get $wdD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g1) (local.get $g1)))))
      (local.set $h01 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w01))))
      (local.set $h11 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w11))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q1 (f32x4.mul (local.get $p1) (local.get $decay)))
      (local.set $s01 (f64x2.add (f64x2.mul (local.get $h01) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q1))))
      (local.set $s11 (f64x2.add (f64x2.mul (local.get $h11) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q1) (local.get $q1)))))
      (local.set $p1 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s01)) (f32x4.demote_f64x2_zero (local.get $s11))))
      (local.set $bad1 (v128.or (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $w01) (local.get $w11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s01) (local.get $s11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))))
      (if (v128.any_true (v128.or (local.get $bad0) (local.get $bad1)))
        (then
          ;; a lane's f64 sum may be a float32 midpoint: check precisely, redo such a block exactly
          ;; (its memory is untouched so far)
          (if (i32.or (call $needs_exact (local.get $w00) (local.get $w10)) (call $needs_exact (local.get $s00) (local.get $s10)))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0))) (local.get $p0) (local.get $mu) (local.get $averaging))))
          (if (i32.or (call $needs_exact (local.get $w01) (local.get $w11)) (call $needs_exact (local.get $s01) (local.get $s11)))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16))) (local.get $p1) (local.get $mu) (local.get $averaging)))))
        (else
          (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
          (v128.store (i32.add (local.get $ap) (local.get $i)) (local.get $p0))
          (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
          (v128.store offset=16 (i32.add (local.get $ap) (local.get $i)) (local.get $p1))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $blocks)))
    (local.get $i))

  ;; weight decay, averaging
  (func $fast_wd_avg (param $end i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decay v128) (param $negEta v128) (param $negEtaD v128) (param $wd v128) (param $wdD v128)
      (param $mu v128) (param $sign v128) (param $flags i32) (result i32)
    (local $i i32) (local $averaging i32) (local $etaD v128)
    (local $p0 v128) (local $g0 v128) (local $q0 v128) (local $a0 v128) (local $bad0 v128) (local $h00 v128) (local $h10 v128) (local $s00 v128) (local $s10 v128)
    (local $p1 v128) (local $g1 v128) (local $q1 v128) (local $a1 v128) (local $bad1 v128) (local $h01 v128) (local $h11 v128) (local $s01 v128) (local $s11 v128)
    (local $w00 v128) (local $w10 v128) (local $w01 v128) (local $w11 v128)
    (local.set $averaging (i32.and (local.get $flags) (i32.const 2)))
    (local.set $etaD (local.get $negEtaD))
    (block $done (loop $blocks
      (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
      ;; block 0: the first four elements
      (local.set $p0 (v128.load (i32.add (local.get $pp) (local.get $i))))
      (local.set $g0 (v128.xor (v128.load (i32.add (local.get $gp) (local.get $i))) (local.get $sign)))
      ;; g = fma(p, wd, g), kept as two f64x2 (exact float32 values)
      (local.set $w00 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (local.get $p0)) (local.get $wdD))
        (f64x2.promote_low_f32x4 (local.get $g0))))
      (local.set $w10 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p0) (local.get $p0))) (local.get $wdD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g0) (local.get $g0)))))
      (local.set $h00 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w00))))
      (local.set $h10 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w10))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q0 (f32x4.mul (local.get $p0) (local.get $decay)))
      (local.set $s00 (f64x2.add (f64x2.mul (local.get $h00) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q0))))
      (local.set $s10 (f64x2.add (f64x2.mul (local.get $h10) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q0) (local.get $q0)))))
      (local.set $p0 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s00)) (f32x4.demote_f64x2_zero (local.get $s10))))
      (local.set $bad0 (v128.or (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $w00) (local.get $w10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s00) (local.get $s10)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))))
      ;; block 1: the second four elements
      (local.set $p1 (v128.load offset=16 (i32.add (local.get $pp) (local.get $i))))
      (local.set $g1 (v128.xor (v128.load offset=16 (i32.add (local.get $gp) (local.get $i))) (local.get $sign)))
      ;; g = fma(p, wd, g), kept as two f64x2 (exact float32 values)
      (local.set $w01 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (local.get $p1)) (local.get $wdD))
        (f64x2.promote_low_f32x4 (local.get $g1))))
      (local.set $w11 (f64x2.add
        (f64x2.mul (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $p1) (local.get $p1))) (local.get $wdD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $g1) (local.get $g1)))))
      (local.set $h01 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w01))))
      (local.set $h11 (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $w11))))
      ;; p = fma(g, -eta, p * decay)
      (local.set $q1 (f32x4.mul (local.get $p1) (local.get $decay)))
      (local.set $s01 (f64x2.add (f64x2.mul (local.get $h01) (local.get $etaD))
        (f64x2.promote_low_f32x4 (local.get $q1))))
      (local.set $s11 (f64x2.add (f64x2.mul (local.get $h11) (local.get $etaD))
        (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 8 9 10 11 12 13 14 15 (local.get $q1) (local.get $q1)))))
      (local.set $p1 (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        (f32x4.demote_f64x2_zero (local.get $s01)) (f32x4.demote_f64x2_zero (local.get $s11))))
      (local.set $bad1 (v128.or (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $w01) (local.get $w11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))
        (i32x4.eq (v128.and (i8x16.shuffle 0 1 2 3 8 9 10 11 16 17 18 19 24 25 26 27 (local.get $s01) (local.get $s11)) (v128.const i32x4 0x0fffffff 0x0fffffff 0x0fffffff 0x0fffffff)) (v128.const i64x2 0 0))))
      (if (v128.any_true (v128.or (local.get $bad0) (local.get $bad1)))
        (then
          ;; a lane's f64 sum may be a float32 midpoint: check precisely, redo such a block exactly
          ;; (its memory is untouched so far)
          (if (i32.or (call $needs_exact (local.get $w00) (local.get $w10)) (call $needs_exact (local.get $s00) (local.get $s10)))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 0)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 0))) (local.get $p0) (local.get $mu) (local.get $averaging))))
          (if (i32.or (call $needs_exact (local.get $w01) (local.get $w11)) (call $needs_exact (local.get $s01) (local.get $s11)))
            (then (call $block
              (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $gp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16)))
              (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
              (local.get $mu) (local.get $sign) (local.get $flags)))
            (else (call $finish (i32.add (local.get $pp) (i32.add (local.get $i) (i32.const 16)))
              (i32.add (local.get $ap) (i32.add (local.get $i) (i32.const 16))) (local.get $p1) (local.get $mu) (local.get $averaging)))))
        (else
          (local.set $a0 (v128.load (i32.add (local.get $ap) (local.get $i))))
          (v128.store (i32.add (local.get $pp) (local.get $i)) (local.get $p0))
          (v128.store (i32.add (local.get $ap) (local.get $i))
            (f32x4.add (local.get $a0) (f32x4.mul (f32x4.sub (local.get $p0) (local.get $a0)) (local.get $mu))))
          (local.set $a1 (v128.load offset=16 (i32.add (local.get $ap) (local.get $i))))
          (v128.store offset=16 (i32.add (local.get $pp) (local.get $i)) (local.get $p1))
          (v128.store offset=16 (i32.add (local.get $ap) (local.get $i))
            (f32x4.add (local.get $a1) (f32x4.mul (f32x4.sub (local.get $p1) (local.get $a1)) (local.get $mu))))))
      (local.set $i (i32.add (local.get $i) (i32.const 32)))
      (br $blocks)))
    (local.get $i))

  ;; ---------------------------------------------------------------- the step
  (func (export "step") (param $n i32) (param $pp i32) (param $gp i32) (param $ap i32)
      (param $decayS f32) (param $negEtaS f32) (param $wdS f32) (param $muS f32) (param $flags i32)
    (local $decay v128) (local $negEta v128) (local $negEtaD v128) (local $wd v128) (local $wdD v128)
    (local $mu v128) (local $sign v128)
    (local $end8 i32) (local $end i32) (local $rest i32) (local $i i32)
    (local.set $decay (f32x4.splat (local.get $decayS)))
    (local.set $negEta (f32x4.splat (local.get $negEtaS)))
    (local.set $negEtaD (f64x2.splat (f64.promote_f32 (local.get $negEtaS))))
    (local.set $wd (f32x4.splat (local.get $wdS)))
    (local.set $wdD (f64x2.splat (f64.promote_f32 (local.get $wdS))))
    (local.set $mu (f32x4.splat (local.get $muS)))
    (local.set $sign (i32x4.splat (select (i32.const 0x80000000) (i32.const 0) (i32.and (local.get $flags) (i32.const 4)))))
    (local.set $end (i32.shl (i32.and (local.get $n) (i32.const -4)) (i32.const 2)))
    (local.set $end8 (i32.shl (i32.and (local.get $n) (i32.const -8)) (i32.const 2)))

    ;; the unfused mode has no fast loop: every block is the plain one
    (if (i32.eqz (i32.and (local.get $flags) (i32.const 8)))
      (then
        (local.set $i
          (if (result i32) (i32.and (local.get $flags) (i32.const 1))
            (then
              (if (result i32) (i32.and (local.get $flags) (i32.const 2))
                (then (call $fast_wd_avg (local.get $end8) (local.get $pp) (local.get $gp) (local.get $ap)
                  (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
                  (local.get $mu) (local.get $sign) (local.get $flags)))
                (else (call $fast_wd_copy (local.get $end8) (local.get $pp) (local.get $gp) (local.get $ap)
                  (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
                  (local.get $mu) (local.get $sign) (local.get $flags)))))
            (else
              (if (result i32) (i32.and (local.get $flags) (i32.const 2))
                (then (call $fast_nowd_avg (local.get $end8) (local.get $pp) (local.get $gp) (local.get $ap)
                  (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
                  (local.get $mu) (local.get $sign) (local.get $flags)))
                (else (call $fast_nowd_copy (local.get $end8) (local.get $pp) (local.get $gp) (local.get $ap)
                  (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
                  (local.get $mu) (local.get $sign) (local.get $flags)))))))))

    ;; the remaining whole blocks of four (or all of them, unfused): the exact block
    (block $done4 (loop $blocks4
      (br_if $done4 (i32.ge_u (local.get $i) (local.get $end)))
      (call $block
        (i32.add (local.get $pp) (local.get $i)) (i32.add (local.get $gp) (local.get $i)) (i32.add (local.get $ap) (local.get $i))
        (local.get $decay) (local.get $negEta) (local.get $negEtaD) (local.get $wd) (local.get $wdD)
        (local.get $mu) (local.get $sign) (local.get $flags))
      (local.set $i (i32.add (local.get $i) (i32.const 16)))
      (br $blocks4)))

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
