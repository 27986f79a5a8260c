<?php
// A legacy client written the way the old services' PHP users write it (php-curl, arrays).
// Usage: php client.php MODE URL KEY
//   MODE: json | json-no-header | form | form-json-header | int-user | multipart | stream
//         | error | bearer-json | bearer-form
// Prints the raw reply body on stdout (stream: each chunk as it arrives);
// "HTTP <status>" (and, for stream, "writes <n>") on stderr.

if ($argc !== 4) {
    fwrite(STDERR, "usage: php client.php MODE URL KEY (modes: see the top of this file)\n");
    exit(2);
}
$mode = $argv[1];
$url = $argv[2];
$key = $argv[3];

// The docs' PHP example, as written there.
function chat_params($key)
{
    $arr = array();
    $arr['api_secret_key'] = $key;
    $arr['user'] = '张三';
    {
        $one = ["role" => 'user', "content" => "1+100="];
        $messages = array(); $messages[] = $one;
        $arr['messages'] = $messages;
    }
    return $arr;
}

// The 快AI docs' PHP example (002_*): the key in a Bearer header, no model, no body key.
function bearer_params()
{
    $params = array();
    $params['user'] = '张三';
    {
        $one = ["role" => 'user', "content" => "1+100="];
        $messages = array(); $messages[] = $one;
        $params['messages'] = $messages;
    }
    return $params;
}

$writes = 0;
$headers = array();
$ch = curl_init($url);
curl_setopt($ch, CURLOPT_POST, true);
curl_setopt($ch, CURLOPT_TIMEOUT, 30);
curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);

switch ($mode) {
    case 'json':
    case 'error':
        curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode(chat_params($key)));
        $headers[] = 'Content-Type: application/json';
        break;
    case 'json-no-header':
        // No Content-Type set: php-curl sends application/x-www-form-urlencoded.
        curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode(chat_params($key)));
        break;
    case 'form':
        $arr = chat_params($key);
        $arr['temperature'] = 0.5;
        $arr['max_tokens'] = 100;
        $arr['stream'] = false;  // http_build_query sends stream=0
        curl_setopt($ch, CURLOPT_POSTFIELDS, http_build_query($arr));
        break;
    case 'form-json-header':
        // The docs' Tool::_request: an http_build_query body, with the JSON header the
        // docs tell users to add ("post请求要自己添加请求头Content-Type: application/json").
        curl_setopt($ch, CURLOPT_POSTFIELDS, http_build_query(chat_params($key)));
        $headers[] = 'Content-Type: application/json';
        break;
    case 'int-user':
        // A PHP integer user id: json_encode sends it as a JSON number.
        $arr = chat_params($key);
        $arr['user'] = 10086;
        curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode($arr));
        $headers[] = 'Content-Type: application/json';
        break;
    case 'bearer-json':
    case 'bearer-form':
        // 快AI: "Content-Type: application/json" and "Authorization: Bearer <key>" headers;
        // Tool::_request may json_encode the array or http_build_query it.
        $params = bearer_params();
        $body = $mode === 'bearer-json' ? json_encode($params) : http_build_query($params);
        curl_setopt($ch, CURLOPT_POSTFIELDS, $body);
        $headers[] = 'Content-Type: application/json';
        $headers[] = 'Authorization: Bearer ' . $key;
        break;
    case 'multipart':
        // An array (not a string) makes php-curl send multipart/form-data.
        curl_setopt($ch, CURLOPT_POSTFIELDS, array(
            'api_secret_key' => $key,
            'messages[0][role]' => 'user',
            'messages[0][content]' => '你好，世界',
            'n' => '1',
        ));
        break;
    case 'stream':
        $arr = chat_params($key);
        $arr['stream'] = true;
        curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode($arr));
        $headers[] = 'Content-Type: application/json';
        curl_setopt($ch, CURLOPT_WRITEFUNCTION, function ($ch, $data) use (&$writes) {
            $writes++;
            echo $data;
            flush();
            return strlen($data);
        });
        break;
    default:
        fwrite(STDERR, "unknown mode: $mode\n");
        exit(2);
}
if ($headers) {
    curl_setopt($ch, CURLOPT_HTTPHEADER, $headers);
}

$chatgpt_back = curl_exec($ch);
if ($chatgpt_back === false) {
    fwrite(STDERR, 'curl error: ' . curl_error($ch) . "\n");
    exit(1);
}
if ($mode !== 'stream') {
    echo $chatgpt_back;
}
fwrite(STDERR, 'HTTP ' . curl_getinfo($ch, CURLINFO_RESPONSE_CODE) . "\n");
if ($mode === 'stream') {
    fwrite(STDERR, "writes $writes\n");
}
curl_close($ch);
